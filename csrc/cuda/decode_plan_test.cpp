// Unit test of the decode split planner (avar_decode_split_plan in decode.h), host only: .ci/nvcc_check.sh builds
// and runs it. Exits non-zero with a message on the first failed property.
#include <cstdio>
#include <cstdlib>

#include "decode.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, long base, long resident, int sk, int tile, int forced,
            const avar::DecodeSplitPlan& plan) {
    if (ok) return;
    ++failures;
    std::printf("decode_plan_test: FAILED: %s (base %ld, resident %ld, sk %d, tile %d, forced %d -> splits %d, "
                "keys per split %d)\n",
                what, base, resident, sk, tile, forced, plan.num_splits, plan.keys_per_split);
}

void check(long base, long resident, int sk, int tile, int forced) {
    const avar::DecodeSplitPlan plan = avar::avar_decode_split_plan(base, resident, sk, tile, forced);
    const long splits = plan.num_splits, kps = plan.keys_per_split;
    expect(splits >= 1 && splits <= avar::kDecodeMaxSplits, "splits in [1, max]", base, resident, sk, tile, forced,
           plan);
    expect(kps >= tile && kps % tile == 0, "keys per split a positive multiple of the tile", base, resident, sk, tile,
           forced, plan);
    expect(splits * kps >= sk, "the splits cover the cache", base, resident, sk, tile, forced, plan);
    expect(splits == 1 || (splits - 1) * kps < sk, "no empty split", base, resident, sk, tile, forced, plan);
    if (forced > 0) {
        expect(splits <= forced, "at most the forced count", base, resident, sk, tile, forced, plan);
        return;
    }
    // One wave: the split grid fits the resident slots whenever one split's grid does.
    expect(base > resident || splits * base <= resident, "one wave", base, resident, sk, tile, forced, plan);
    expect(splits == 1 || kps >= avar::kDecodeMinKeysPerSplit, "enough keys per split", base, resident, sk, tile,
           forced, plan);
    // floor(resident / base) splits, capped by the length; rounding the share up to the tile only merges splits.
    const long by_wave = resident / (base > 0 ? base : 1), by_len = sk / avar::kDecodeMinKeysPerSplit;
    long want = by_wave < by_len ? by_wave : by_len;
    want = want < 1 ? 1 : (want > avar::kDecodeMaxSplits ? avar::kDecodeMaxSplits : want);
    expect(splits <= want, "at most floor(resident / base) splits", base, resident, sk, tile, forced, plan);
    expect(sk == 0 || kps < (sk + want - 1) / want + tile, "each split an even share up to one tile", base,
           resident, sk, tile, forced, plan);
}

}  // namespace

int main() {
    // The decode benchmark's shape on an H100/H200: B=8, Hk=4 (32 CTAs per split), 132 SMs x 2 CTAs = 264 slots.
    // The old planner (about two waves) made 9 splits = 288 CTAs, a partial second wave; one wave is 8 splits.
    const avar::DecodeSplitPlan h200 = avar::avar_decode_split_plan(32, 264, 32768, 64);
    expect(h200.num_splits == 8 && h200.keys_per_split == 4096, "B=8 Hk=4 Sk=32k on 264 slots: 8 x 4096", 32, 264,
           32768, 64, 0, h200);
    const avar::DecodeSplitPlan short_cache = avar::avar_decode_split_plan(32, 264, 1000, 64);
    expect(short_cache.num_splits == 3, "Sk=1000: 3 splits (>= 256 keys each)", 32, 264, 1000, 64, 0, short_cache);
    const avar::DecodeSplitPlan busy = avar::avar_decode_split_plan(400, 264, 131072, 64);
    expect(busy.num_splits == 1, "more CTAs than slots: 1 split", 400, 264, 131072, 64, 0, busy);
    const avar::DecodeSplitPlan empty = avar::avar_decode_split_plan(8, 264, 0, 64);
    expect(empty.num_splits == 1 && empty.keys_per_split == 64, "an empty cache: one split of one tile", 8, 264, 0,
           64, 0, empty);

    const long bases[] = {1, 2, 3, 7, 8, 28, 32, 33, 64, 132, 263, 264, 265, 1000};
    const long residents[] = {1, 108, 132, 216, 264, 528};
    const int sks[] = {0, 1, 16, 63, 64, 65, 255, 256, 257, 1000, 4096, 4097, 32768, 131072, 1 << 20};
    const int tiles[] = {32, 64};
    const int forced[] = {0, 1, 3, 128};
    for (long b : bases)
        for (long r : residents)
            for (int sk : sks)
                for (int t : tiles)
                    for (int f : forced) check(b, r, sk, t, f);
    if (failures) return 1;
    std::printf("decode_plan_test: OK\n");
    return 0;
}
