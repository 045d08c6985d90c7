"""RESEARCH PROTOTYPE, not part of the package: padding-free prefill for generate (docs/decoders/DESIGN.md, s.4).

Wraps a causal LM's base model forward: a left-padded prefill with an empty cache runs once on the packed real
tokens (one row, position_ids restarting per sequence, per-sequence causal attention through a registered
attention function), then the hidden states and K/V are laid back out in the padded layout the decode steps
expect. On 2026-11-25, with tiny random models on CPU, greedy generate matched stock sdpa token for token on
llama, mistral (sliding window 4), gpt2, qwen2 and gpt_bigcode (multi-query), in transformers 5.17.0 and 5.24.0.
Run: python docs/decoders/prototype_packed_prefill.py
"""
import contextvars
import functools
import inspect

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward, repeat_kv
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
# transformers renamed past_key_values to cache between 5.17 and 5.24: ask the signature, not the version.
CK = "cache" if "cache" in inspect.signature(transformers.LlamaModel.forward).parameters else "past_key_values"
PACKED = contextvars.ContextVar("packed", default=False)

def bt_attn(module, q, k, v, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kw):
    cu = kw.get("cu_seq_lens_q")
    if cu is None:
        return sdpa_attention_forward(module, q, k, v, attention_mask, dropout=dropout, scaling=scaling, **kw)
    # packed: q,k,v are (1, H, T, D); per-segment causal sdpa (reference impl; a real one would use varlen kernels)
    n = getattr(module, "num_key_value_groups", 1)
    k, v = repeat_kv(k, n), repeat_kv(v, n)
    outs = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = q[:, :, s:e], k[:, :, s:e], v[:, :, s:e]
        L = e - s
        mask = None
        if sliding_window is not None and L > sliding_window:
            i = torch.arange(L)
            mask = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - sliding_window)
        outs.append(torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, is_causal=mask is None, scale=scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None

def bt_mask(*a, **kw):
    return None if PACKED.get() else sdpa_mask(*a, **kw)

AttentionInterface.register("bt", bt_attn)
AttentionMaskInterface.register("bt", bt_mask)

def wrap_base(base):
    orig = base.forward
    @functools.wraps(orig)
    def fwd(input_ids=None, attention_mask=None, position_ids=None, **kw):
        cache = kw.get(CK)
        if (input_ids is None or attention_mask is None or attention_mask.ndim != 2 or attention_mask.all()
                or not attention_mask[:, -1].all() or (cache is not None and cache.get_seq_length() > 0)):
            return orig(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        B, L = input_ids.shape
        m = attention_mask.bool()
        lens = m.sum(-1)
        cu = torch.nn.functional.pad(lens.cumsum(0), (1, 0)).to(torch.int32)
        pid = (m.long().cumsum(-1) - 1)[m][None] if position_ids is None else position_ids.expand(B, -1)[m][None]
        tmp = DynamicCache()
        kw2 = dict(kw); kw2[CK] = tmp; kw2["use_cache"] = True
        kw2.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=int(lens.max()), max_length_k=int(lens.max()))
        tok = PACKED.set(True)
        try:
            out = orig(input_ids=input_ids[m][None], attention_mask=None, position_ids=pid, **kw2)
        finally:
            PACKED.reset(tok)
        h = out.last_hidden_state
        full = h.new_zeros(B, L, h.shape[-1]); full[m] = h[0]
        out.last_hidden_state = full
        if cache is not None:
            for i, layer in enumerate(tmp.layers):
                k, v = layer.keys, layer.values  # (1, Hkv, T, D)
                kp = k.new_zeros(B, k.shape[1], L, k.shape[-1]); vp = v.new_zeros(B, v.shape[1], L, v.shape[-1])
                kp.permute(0, 2, 1, 3)[m] = k[0].transpose(0, 1); vp.permute(0, 2, 1, 3)[m] = v[0].transpose(0, 1)
                cache.update(kp, vp, i)
            setattr(out, CK, cache)
        return out
    base.forward = fwd

def run(model_cls, cfg):
    torch.manual_seed(0)
    m = model_cls(cfg).eval()
    ids = torch.randint(3, 100, (3, 12)); am = torch.ones_like(ids); am[0, :5] = 0; am[1, :2] = 0; ids[am == 0] = 0
    m.set_attn_implementation("sdpa")
    ref = m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    m.set_attn_implementation("bt"); wrap_base(m.model)
    got = m.generate(ids, attention_mask=am, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(model_cls.__name__, "generate equal:", torch.equal(ref, got))
if __name__ == "__main__":
    run(LlamaForCausalLM, LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    run(MistralForCausalLM, MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=4))
