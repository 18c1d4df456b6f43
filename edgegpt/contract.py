"""The ONNX input/output contract, declared once.

The exporter, the manifest, the runtime and the tests read names, dtypes and axes from here;
no IO name string is typed anywhere else. Names follow Optimum / transformers.js, so other
runtimes (ORTModelForCausalLM, onnxruntime-genai's generic decoder) consume our bundles as-is.

    input_ids                      int64  [batch, seq]
    attention_mask                 int64  [batch, past + seq]
    position_ids                   int64  [batch, seq]
    past_key_values.{i}.key/value  kv     [batch, n_head, past, head_dim]   (past may be 0)
 -> logits                         float  [batch, seq | 1, vocab]           (1 with last_logits_only;
                                                                            the last logits_to_keep rows)
    present.{i}.key/value          kv     [batch, n_head, past + seq, head_dim]

Overridable initializers (graph inputs with a default, listed by onnxruntime among
get_overridable_initializers(), not get_inputs(), so a runtime that does not know them runs the default):

    logits_to_keep                 int64  [1]  (default 2^62: every position; the fused export without
                                               --last-logits-only. The logits are those of the last n
                                               positions: the runtime asks for 1 at a prefill, so the LM
                                               head runs once per prompt instead of once per token)
    logits_screen_margin           float  []   (``--lm-head screened`` only; default 0: exact greedy; see
                                               quantize/screen.py)
"""

from __future__ import annotations

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
PAST_KEY = "past_key_values.{}.key"
PAST_VALUE = "past_key_values.{}.value"
PRESENT_KEY = "present.{}.key"
PRESENT_VALUE = "present.{}.value"
SCREEN_MARGIN = "logits_screen_margin"
LOGITS_TO_KEEP = "logits_to_keep"
KEEP_ALL_LOGITS = 1 << 62  # logits_to_keep's default: more positions than any step has

PAST_PREFIX, PRESENT_PREFIX = PAST_KEY.split("{")[0], PRESENT_KEY.split("{")[0]  # "past_key_values.", "present."

BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "past_sequence_length + sequence_length"
SLOTS = "kv_slots"  # shared-buffer layout: the buffer's length, chosen by the runtime (<= kv_capacity)


def is_kv(name: str) -> bool:
    """Whether a graph input or output is part of the KV cache."""
    return name.startswith((PAST_PREFIX, PRESENT_PREFIX))


def kv_dtype(io: dict) -> str:
    """The KV cache's dtype in a manifest's io section."""
    return next(x["dtype"] for x in io["inputs"] if x["name"] == PAST_KEY.format(0))


def past_names(n_layer: int) -> list[str]:
    """[past.0.key, past.0.value, past.1.key, ...]: the order of the graph's KV inputs."""
    return [name.format(i) for i in range(n_layer) for name in (PAST_KEY, PAST_VALUE)]


def present_names(n_layer: int) -> list[str]:
    return [name.format(i) for i in range(n_layer) for name in (PRESENT_KEY, PRESENT_VALUE)]


def input_names(n_layer: int) -> list[str]:
    return [INPUT_IDS, ATTENTION_MASK, POSITION_IDS, *past_names(n_layer)]


def output_names(n_layer: int) -> list[str]:
    return [LOGITS, *present_names(n_layer)]


def io_spec(n_layer: int, n_head: int, head_dim: int, vocab_size: int, *, kv_dtype: str = "float32",
            logits_dtype: str = "float32", last_logits_only: bool = False, kv_capacity: int | None = None) -> dict:
    """Names, dtypes and symbolic shapes of every input and output, as the manifest records them.

    With ``kv_capacity`` (the shared-buffer layout) past and present are one buffer of
    ``kv_slots`` slots (at most kv_capacity, sized by the runtime to prompt + new tokens);
    attention_mask's width says how many are filled.
    """
    kv_in = [BATCH, n_head, SLOTS if kv_capacity else PAST, head_dim]
    kv_out = [BATCH, n_head, SLOTS if kv_capacity else TOTAL, head_dim]
    inputs = [
        {"name": INPUT_IDS, "dtype": "int64", "shape": [BATCH, SEQ]},
        {"name": ATTENTION_MASK, "dtype": "int64", "shape": [BATCH, TOTAL]},
        {"name": POSITION_IDS, "dtype": "int64", "shape": [BATCH, SEQ]},
    ] + [{"name": n, "dtype": kv_dtype, "shape": kv_in} for n in past_names(n_layer)]
    outputs = [{"name": LOGITS, "dtype": logits_dtype, "shape": [BATCH, 1 if last_logits_only else SEQ, vocab_size]}]
    outputs += [{"name": n, "dtype": kv_dtype, "shape": kv_out} for n in present_names(n_layer)]
    return {"inputs": inputs, "outputs": outputs}


def dynamic_axes(n_layer: int, *, last_logits_only: bool = False) -> dict[str, dict[int, str]]:
    """torch.onnx's dynamic_axes for the contract."""
    axes = {INPUT_IDS: {0: BATCH, 1: SEQ}, ATTENTION_MASK: {0: BATCH, 1: TOTAL}, POSITION_IDS: {0: BATCH, 1: SEQ},
            LOGITS: {0: BATCH} if last_logits_only else {0: BATCH, 1: SEQ}}
    axes.update({n: {0: BATCH, 2: PAST} for n in past_names(n_layer)})
    axes.update({n: {0: BATCH, 2: TOTAL} for n in present_names(n_layer)})
    return axes


# Static-shape graphs (mobile packages: NNAPI, CoreML, QNN need every dimension fixed). The KV cache is a
# buffer of P slots the app owns: slot j holds position j. A step of S tokens (S = 1 for decode, a prompt
# bucket for prefill, left-padded) reads the whole buffer, returns only the S new rows, and the app writes
# the real ones into their slots, so nothing is copied or shifted per step. Visibility is an additive bias
# the app builds: 0 where query row r may attend key column c, the graph's mask value elsewhere.
#
#     input_ids                          int32 (NNAPI) | int64  [1, S]
#     position_ids                       as input_ids           [1, S]
#     attention_bias                     kv                     [1, 1, S, P + S]   columns: P slots, then S rows
#     past_key_values.{i}.key/value      kv                     [1, n_head, P, head_dim]
#  -> logits                             float                  [1, 1, vocab]      (the last row's)
#     new_key_values.{i}.key/value       kv                     [1, n_head, S, head_dim]
ATTENTION_BIAS = "attention_bias"
NEW_KEY = "new_key_values.{}.key"
NEW_VALUE = "new_key_values.{}.value"


def new_kv_names(n_layer: int) -> list[str]:
    return [name.format(i) for i in range(n_layer) for name in (NEW_KEY, NEW_VALUE)]
