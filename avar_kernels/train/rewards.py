"""GRPO rewards of AVAR: ``r_total = r_acc + 0.3 r_visual + 0.1 r_format``.

* :func:`accuracy_reward`: 1 when the ``<answer>...</answer>`` content (the last one; the whole response, without
  its ``<think>`` part, when there is none, as in the released EasyR1 reward) matches the reference: numbers with a
  tolerance (and a rounded answer within half a unit of its last digit), fractions, simple LaTeX (``\\frac``,
  ``\\sqrt``, ``\\pi``, ``\\boxed``, degrees, units), multiple-choice letters, otherwise case-insensitive text.
* :func:`format_reward`: 1 when the response is ``<think>...</think><answer>...</answer>`` (whitespace around).
* :class:`VisualReward`: the policy's visual-attention reward (``metrics.visual_reward``) on the generated tokens,
  0 for wrong answers; it runs one no-grad forward of the policy with the fused kernels recording the masses.

Each is a TRL reward function ``f(prompts, completions, completion_ids, **columns) -> list[float]``; the reference
answers come from the dataset column ``answer``.
"""
from __future__ import annotations

import ast
import math
import operator
import re

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
FORMAT_RE = re.compile(r"\s*<think>.*?</think>\s*<answer>.*?</answer>\s*", re.DOTALL)
THINK_RE = re.compile(r"<think>.*?</think>", re.DOTALL)
CHOICE_RE = re.compile(r"^\(?([A-Ha-h])\)?(?:[.:)]|\s|$)")
UNITS = ("cm", "mm", "km", "m", "in", "ft", "units", "unit", "sq", "square", "meters", "meter", "inches", "inch",
         "feet", "degrees", "degree", "deg", "kg", "g", "s", "seconds", "min", "minutes", "hours", "h", "dollars")


def completion_text(completion) -> str:
    """The text of a TRL completion: a string, or conversational ``[{"role": "assistant", "content": ...}]``."""
    if isinstance(completion, str):
        return completion
    parts = []
    for message in completion:
        content = message.get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(content)
    return "".join(parts)


def extract_answer(response: str) -> str:
    found = ANSWER_RE.findall(response)
    if found:
        return found[-1].strip()
    return THINK_RE.sub("", response).strip()


def _braced(s, start):
    """(content, end) of the ``{...}`` group that opens at ``s[start]``."""
    depth = 0
    for i in range(start, len(s)):
        if s[i] == "{":
            depth += 1
        elif s[i] == "}":
            depth -= 1
            if depth == 0:
                return s[start + 1:i], i + 1
    raise ValueError("unbalanced braces")


def _unwrap(s, command):
    r"""``\command{x}`` -> ``x`` everywhere."""
    while True:
        i = s.find(command + "{")
        if i < 0:
            return s
        inner, end = _braced(s, i + len(command))
        s = s[:i] + inner + s[end:]


def _latex_to_expr(s):
    for cmd in ("\\dfrac", "\\tfrac", "\\frac"):
        while cmd + "{" in s:
            i = s.find(cmd + "{")
            num, j = _braced(s, i + len(cmd))
            if j >= len(s) or s[j] != "{":
                raise ValueError("\\frac without a denominator")
            den, k = _braced(s, j)
            s = s[:i] + f"(({num})/({den}))" + s[k:]
    while "\\sqrt{" in s:
        i = s.find("\\sqrt{")
        arg, j = _braced(s, i + 5)
        s = s[:i] + f"sqrt({arg})" + s[j:]
    s = re.sub(r"\\sqrt\s*(\d+(?:\.\d+)?)", r"sqrt(\1)", s)
    s = s.replace("\\pi", "pi").replace("π", "pi").replace("\\cdot", "*").replace("\\times", "*")
    s = s.replace("√", "sqrt").replace("{", "(").replace("}", ")").replace("^", "**")
    s = re.sub(r"sqrt(\d+(?:\.\d+)?)", r"sqrt(\1)", s)
    # implicit products: 2sqrt(3), 3pi, 2(x), )(
    s = re.sub(r"(\d|\))\s*(?=sqrt|pi|\()", r"\1*", s)
    return s


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.Pow: operator.pow, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.Name) and node.id == "pi":
        return math.pi
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
            and len(node.args) == 1 and not node.keywords):
        return math.sqrt(_eval(node.args[0]))
    raise ValueError("not a number")


def normalize(s: str) -> str:
    """Answer text without LaTeX wrappers, degree marks, units, thousands separators and surrounding ``$``."""
    s = s.strip()
    for cmd in ("\\boxed", "\\text", "\\textbf", "\\mathrm", "\\mbox"):
        s = _unwrap(s, cmd)
    s = s.replace("\\left", "").replace("\\right", "").replace("\\!", "").replace("\\,", "").replace("\\ ", " ")
    s = s.replace("^\\circ", "").replace("^{\\circ}", "").replace("\\circ", "").replace("°", "").replace("\\%", "%")
    s = s.strip().strip("$").strip()
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)
    unit = r"\s*(?:" + "|".join(UNITS) + r")(?:\s*\*\*\s*\d|\^\s*\d|\^\{\d\})?\.?$"
    stripped = re.sub(unit, "", s, flags=re.IGNORECASE)
    if stripped != s and re.search(r"[\d)}]\s*$", stripped):
        s = stripped
    return s.rstrip(".").strip()


def to_number(s: str):
    """The value of a number or simple expression (``3/4``, ``\\frac{3}{4}``, ``2\\sqrt{3}``, ``50%``), or None."""
    s = normalize(s)
    percent = s.endswith("%")
    if percent:
        s = s[:-1].strip()
    if not s or not re.fullmatch(r"[\d\s.+\-*/^(){}\\a-zA-Zπ√]*", s) or re.search(r"[a-zA-Z]{2,}", s.replace(
            "sqrt", "").replace("frac", "").replace("dfrac", "").replace("tfrac", "").replace("pi", "")):
        return None
    try:
        value = _eval(ast.parse(_latex_to_expr(s), mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    if not math.isfinite(value):
        return None
    return value / 100 if percent else value


def _decimals(s):
    m = re.fullmatch(r"\s*-?\d+\.(\d+)\s*", normalize(s))
    return len(m.group(1)) if m else None


def choice_letter(s: str):
    """The multiple-choice letter of an answer (``B``, ``(B)``, ``B.``, ``B) 12``), or None."""
    m = CHOICE_RE.match(normalize(s))
    return m.group(1).upper() if m else None


def answers_match(predicted: str, reference: str, *, rel_tol: float = 1e-4) -> bool:
    """Whether ``predicted`` gives the ``reference`` answer (see the module doc)."""
    pred, ref = normalize(predicted), normalize(reference)
    if not pred:
        return False
    ref_letter = choice_letter(ref) if len(ref) <= 3 else None
    if ref_letter is not None and to_number(ref) is None:
        return choice_letter(pred) == ref_letter or pred.lower() == ref.lower()
    a, b = to_number(pred), to_number(ref)
    if a is not None and b is not None:
        if math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9):
            return True
        places = _decimals(pred)           # a rounded answer: within half a unit of its last digit
        return places is not None and abs(a - b) <= 0.5 * 10 ** -places + 1e-12
    if a is not None or b is not None:
        return False
    return " ".join(pred.lower().split()) == " ".join(ref.lower().split())


def accuracy_reward(prompts, completions, completion_ids=None, *, answer, **kwargs) -> list:
    """1.0 / 0.0 per completion against the ``answer`` column."""
    return [float(answers_match(extract_answer(completion_text(c)), str(a))) for c, a in zip(completions, answer)]


def format_reward(prompts, completions, completion_ids=None, **kwargs) -> list:
    """1.0 when the completion is ``<think>...</think><answer>...</answer>``."""
    return [float(bool(FORMAT_RE.fullmatch(completion_text(c)))) for c in completions]


class VisualReward:
    """The visual-attention reward of the policy on its own rollouts (0 for wrong answers).

    ``trainer`` is set once the GRPO trainer exists (its unwrapped model and processor are used). For each batch
    it re-encodes the prompts with their images, appends the generated ids, and runs one forward under
    :func:`avar_kernels.hf.record` (head-summed masses, ``layers`` all by default); the generated tokens are the
    rows of :func:`avar_kernels.metrics.visual_reward` (``aggregate`` as there)."""

    __name__ = "visual_reward"

    def __init__(self, processor, *, layers=None, aggregate="per_token", eps=1e-6):
        self.processor, self.layers, self.aggregate, self.eps = processor, layers, aggregate, eps
        self.trainer = None

    def __call__(self, prompts, completions, completion_ids, *, answer, **kwargs) -> list:
        import torch

        from avar_kernels import metrics

        if self.trainer is None:
            raise RuntimeError("VisualReward: set .trainer to the GRPO trainer before training")
        correct = accuracy_reward(prompts, completions, answer=answer)
        if not any(correct):
            return [0.0] * len(completions)
        model = self.trainer.accelerator.unwrap_model(self.trainer.model)
        inputs, classes, rows = rollout_inputs(self.processor, prompts, completion_ids, model.device)
        from avar_kernels import hf as ah

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), ah.record(model, classes, layers=self.layers, reduce="sum_heads") as rec:
                model(**inputs, use_cache=False)
        finally:
            model.train(was_training)
        r = metrics.visual_reward(rec.mass, classes, correct=correct, query_mask=rows, eps=self.eps,
                                  aggregate=self.aggregate)
        return r.tolist()


def rollout_inputs(processor, prompts, completion_ids, device):
    """Model inputs for prompt + generated tokens (right padded), their token classes (generated tokens are
    RESPONSE) and the bool mask of the generated rows."""
    import torch

    from avar_kernels import hf as ah
    from avar_kernels.types import RESPONSE

    texts, images = [], []
    for prompt in prompts:
        texts.append(processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False))
        for message in prompt:
            if isinstance(message.get("content"), list):
                images += [p["image"] for p in message["content"] if p.get("type") == "image"]
    enc = processor(text=texts, images=images or None, return_tensors="pt", padding=True, padding_side="left")
    prompt_ids, prompt_mask = enc["input_ids"], enc["attention_mask"]
    gen = [list(map(int, c)) for c in completion_ids]
    width = max(len(g) for g in gen)
    pad = processor.tokenizer.pad_token_id
    gen_ids = torch.tensor([g + [pad] * (width - len(g)) for g in gen], dtype=torch.long)
    gen_mask = torch.tensor([[1] * len(g) + [0] * (width - len(g)) for g in gen], dtype=torch.long)
    prompt_classes = ah.token_classes(prompt_ids, processor, attention_mask=prompt_mask,
                                      image_token_id=processor.image_token_id)
    gen_classes = torch.where(gen_mask.bool(), torch.full_like(gen_ids, RESPONSE), torch.zeros_like(gen_ids))
    inputs = {"input_ids": torch.cat([prompt_ids, gen_ids], 1),
              "attention_mask": torch.cat([prompt_mask, gen_mask], 1),
              "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"], torch.zeros_like(gen_ids)], 1)}
    if "pixel_values" in enc:
        inputs["pixel_values"], inputs["image_grid_thw"] = enc["pixel_values"], enc["image_grid_thw"]
    rows = torch.cat([torch.zeros_like(prompt_mask, dtype=torch.bool), gen_mask.bool()], 1)
    classes = torch.cat([prompt_classes, gen_classes], 1)
    inputs = {k: v.to(device) for k, v in inputs.items()}
    return inputs, classes.to(device), rows.to(device)
