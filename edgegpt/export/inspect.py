"""`edgegpt inspect`: a bundle's manifest in human form (pure Python; no torch or onnx)."""

from __future__ import annotations

from pathlib import Path

from edgegpt.manifest import read_manifest


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def describe(bundle: str | Path) -> str:
    m = read_manifest(bundle)
    a, g = m["architecture"], m["graph"]
    lines = [
        f"bundle      {Path(bundle)}",
        f"model       GPT-2 family: {a['n_layer']} layers, {a['n_head']} heads x {a['head_dim']}, "
        f"{a['n_embd']} wide, vocab {a['vocab_size']}, context {m['max_context']}",
        f"precision   {m['precision']}  recipe {m.get('recipe', {})}",
        f"graph       {g['file']}{' + ' + g['external_data'] if g.get('external_data') else ''}, opset {g['opset']}, "
        f"{sum(g['op_counts'].values())} nodes ({', '.join(f'{k} {v}' for k, v in list(g['op_counts'].items())[:8])}"
        f"{', ...' if len(g['op_counts']) > 8 else ''})",
        "options     " + ", ".join(f"{k}={v}" for k, v in g.get("options", {}).items()),
        f"size        {_mb(m.get('size_bytes', 0))}",
        f"tokens      bos {m.get('bos_token_id')}, eos {m.get('eos_token_id')}, pad {m.get('pad_token_id')}",
        "inputs      " + ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in m["io"]["inputs"][:4])
        + (f", ... ({len(m['io']['inputs'])} in all)" if len(m["io"]["inputs"]) > 4 else ""),
        "outputs     " + ", ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in m["io"]["outputs"][:2])
        + (f", ... ({len(m['io']['outputs'])} in all)" if len(m["io"]["outputs"]) > 2 else ""),
    ]
    v = m.get("verification")
    if v:
        lines.append(f"parity      {'PASSED' if v['passed'] else 'FAILED'}: max |logit diff| {v['max_abs_logit_diff']:.2e} "
                     f"(tolerance {v['tolerance']}), greedy agreement {v['greedy_agreement']:.1%} over "
                     f"{v['prompt_tokens']}-token prompt + {v['decode_steps']} decode steps, onnxruntime {v['onnxruntime']}")
    q = m.get("quality")
    if q:
        lines.append("quality     " + ", ".join(f"{k} {v:.6g}" if isinstance(v, float) else f"{k} {v}" for k, v in q.items()))
    src = m.get("source", {})
    if src:
        lines.append(f"source      {src.get('checkpoint')} (sha256 {str(src.get('sha256'))[:12]})")
    return "\n".join(lines)
