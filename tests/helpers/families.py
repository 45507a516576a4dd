"""Tiny random float64 models of every family the invariants matrix walks (``tests/integrations/test_invariants.py``).

Each family is its real 🤗 class with a config shrunk to hidden 32-48, 2 layers and, where the family has it,
grouped-query attention, so the matrix exercises the family's own embedding, positions, attention and cache
code. Dropout in the base model is off: the matrix checks what fastprefix does, and the only randomness in
training mode is then the method's own dropout. A model is built once per family and deep-copied per test.
"""

import copy
import functools

import torch

from helpers.models import PAD, VOCAB  # one vocabulary and pad id for every test model

_COMMON = dict(vocab_size=VOCAB, pad_token_id=PAD)
_DECODER = dict(_COMMON, num_hidden_layers=2, intermediate_size=40, max_position_embeddings=64, bos_token_id=1,
                eos_token_id=None)
# 4 query heads on 2 key/value heads of width 8
_GQA = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Gemma 2/3, windowed Mistral: windows shorter than the test sequences (6 tokens, + 3 generated), so that the
# window hides keys, and a sliding-window KV cache drops its oldest keys while generating
WINDOW = 4


def _build(family):
    import transformers as tf

    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**_GQA, **_DECODER))
    if family == "qwen2":  # GQA 6 -> 2, q/k/v biases
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
                                                  **_DECODER))
    if family == "qwen3":  # q/k RMSNorm, explicit head_dim
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**_GQA, **_DECODER))
    if family == "mistral":  # no sliding window, as Mistral 7B v0.2+
        return tf.MistralForCausalLM(tf.MistralConfig(**_GQA, sliding_window=None, **_DECODER))
    if family == "mistral_window":  # a sliding window, as Mistral 7B v0.1
        return tf.MistralForCausalLM(tf.MistralConfig(**_GQA, sliding_window=WINDOW, **_DECODER))
    if family == "phi3":  # fused qkv and gate_up projections
        return tf.Phi3ForCausalLM(tf.Phi3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                                **_DECODER))
    if family == "gpt2":  # learned absolute positions, Conv1D projections, no GQA
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                bos_token_id=1, eos_token_id=None, **_COMMON))
    if family == "gemma":  # embeddings scaled by sqrt(hidden) inside the embedding module
        return tf.GemmaForCausalLM(tf.GemmaConfig(**_GQA, **_DECODER))
    if family == "gemma2":  # + sliding-window layers, attention (a cap low enough to matter) and final soft-capping
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(**_GQA, **_DECODER, sliding_window=WINDOW,
                                                    query_pre_attn_scalar=8, attn_logit_softcapping=2.0))
    if family == "gemma3":  # + q/k norm, one sliding and one full-attention layer
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(
            **_GQA, **_DECODER, sliding_window=WINDOW, query_pre_attn_scalar=8,
            layer_types=["sliding_attention", "full_attention"]))
    if family == "bert":
        return tf.BertModel(tf.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          intermediate_size=40, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                          attention_probs_dropout_prob=0.0, **_COMMON))
    if family == "roberta":  # position ids derived from the padding of input_ids
        return tf.RobertaModel(tf.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=40, max_position_embeddings=70,
                                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **_COMMON))
    if family == "t5":
        return tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4,
                                                         dropout_rate=0.0, decoder_start_token_id=PAD,
                                                         eos_token_id=None, tie_word_embeddings=False, **_COMMON))
    raise KeyError(family)


DECODERS = ("llama", "qwen2", "qwen3", "mistral", "mistral_window", "phi3", "gpt2", "gemma", "gemma2", "gemma3")
WINDOWED = ("mistral_window", "gemma2", "gemma3")  # sliding windows of WINDOW tokens
ENCODERS = ("bert", "roberta")
ENCODER_DECODERS = ("t5",)
FAMILIES = DECODERS + ENCODERS + ENCODER_DECODERS


@functools.lru_cache(maxsize=None)
def _base(family):
    torch.manual_seed(0)
    return _build(family).to(torch.float64).eval()


def tiny(family):
    """A fresh copy of ``family``'s tiny float64 model, in eval mode (the same weights every call)."""
    return copy.deepcopy(_base(family))
