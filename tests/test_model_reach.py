"""Which models each method reaches: a padded forward works, or ``apply`` refuses with a clear message.

The rule: no model that ``apply`` accepts may fail at its first forward. Each family is a tiny random
config; each cell is one method on it. Deeper properties (padding exactness, caching, checkpointing) are
the invariants matrix's job; here a cell only has to run (finite outputs of the expected length) or be
refused at ``apply`` with the message the table names, leaving the model as it was.
"""

import warnings

import pytest
import torch

import fastprefix
from hf_models import METHODS, PAD, VOCAB, batch, positions

DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=40,
           max_position_embeddings=64)
ENC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
           max_position_embeddings=70)
TOKENS = dict(vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=1, eos_token_id=2)


def _families():
    """family -> (builder, kind): kind "decoder", "encoder" or "seq2seq" decides the padding side and inputs."""
    import transformers as tf

    return {
        "llama": (lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**DEC, **TOKENS)), "decoder"),
        "mistral": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**DEC, sliding_window=None, **TOKENS)), "decoder"),
        "mistral-window": (lambda: tf.MistralForCausalLM(tf.MistralConfig(**DEC, sliding_window=4, **TOKENS)),
                           "decoder"),
        "phi3": (lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**DEC, **TOKENS)), "decoder"),
        "qwen2": (lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**DEC, **TOKENS)), "decoder"),
        "qwen3": (lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**DEC, head_dim=8, **TOKENS)), "decoder"),
        "gpt2": (lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **TOKENS)),
                 "decoder"),
        "gemma": (lambda: tf.GemmaForCausalLM(tf.GemmaConfig(**DEC, head_dim=8, **TOKENS)), "decoder"),
        "gemma2": (lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**DEC, head_dim=8, sliding_window=4, **TOKENS)),
                   "decoder"),
        "gemma3": (lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**DEC, head_dim=8, sliding_window=4, **TOKENS)),
                   "decoder"),
        "opt": (lambda: tf.OPTForCausalLM(tf.OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                       ffn_dim=40, max_position_embeddings=64, word_embed_proj_dim=32,
                                                       **TOKENS)), "decoder"),
        "falcon": (lambda: tf.FalconForCausalLM(tf.FalconConfig(hidden_size=32, num_hidden_layers=2,
                                                                num_attention_heads=4, **TOKENS)), "decoder"),
        "gpt-neox": (lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=2,
                                                                    num_attention_heads=4, intermediate_size=40,
                                                                    max_position_embeddings=64, **TOKENS)), "decoder"),
        "bloom": (lambda: tf.BloomForCausalLM(tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, **TOKENS)),
                  "decoder"),
        "stablelm": (lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**DEC, **TOKENS)), "decoder"),
        "granite": (lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**DEC, **TOKENS)), "decoder"),
        "olmo": (lambda: tf.OlmoForCausalLM(tf.OlmoConfig(**DEC, **TOKENS)), "decoder"),
        "bert": (lambda: tf.BertModel(tf.BertConfig(**ENC, **TOKENS)), "encoder"),
        "roberta": (lambda: tf.RobertaModel(tf.RobertaConfig(**ENC, **TOKENS)), "encoder"),
        "xlm-roberta": (lambda: tf.XLMRobertaModel(tf.XLMRobertaConfig(**ENC, **TOKENS)), "encoder"),
        "electra": (lambda: tf.ElectraModel(tf.ElectraConfig(**ENC, embedding_size=32, **TOKENS)), "encoder"),
        "distilbert": (lambda: tf.DistilBertModel(tf.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=40,
                                                                      max_position_embeddings=64, **TOKENS)),
                       "encoder"),
        "modernbert": (lambda: tf.ModernBertModel(tf.ModernBertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
            max_position_embeddings=64, local_attention=4, cls_token_id=1, sep_token_id=2, **TOKENS)), "encoder"),
        "t5": (lambda: tf.T5ForConditionalGeneration(tf.T5Config(d_model=32, d_kv=8, d_ff=40, num_layers=2,
                                                                 num_heads=4, decoder_start_token_id=PAD,
                                                                 **TOKENS)), "seq2seq"),
    }


FAMILIES = list(_families())
METHOD_IDS = ("pt", "dept", "adept", "ptv2", "apt")
PREFIX = ("ptv2", "apt")

# (family, method) -> the message apply refuses with; every other cell must run
_WINDOW = "not supported on {}: its config.layer_types has 'sliding_attention' layers"
_NOT_ROUTED = "{}'s attention is not routed through transformers' AttentionInterface"
REFUSED = {
    **{("mistral-window", m): "not supported on MistralForCausalLM: it attends within a sliding window"
       for m in PREFIX},
    **{("gemma2", m): _WINDOW.format("Gemma2ForCausalLM") for m in PREFIX},
    **{("gemma3", m): _WINDOW.format("Gemma3ForCausalLM") for m in PREFIX},
    **{("modernbert", m): _WINDOW.format("ModernBertModel") for m in PREFIX},
    **{("opt", m): r"OPTForCausalLM: its forward calls self.model.decoder\(...\) directly, bypassing OPTModel"
       for m in PREFIX},
    **{("falcon", m): _NOT_ROUTED.format("FalconForCausalLM") for m in PREFIX},
    **{("bloom", m): _NOT_ROUTED.format("BloomForCausalLM") for m in PREFIX},
    **{("stablelm", m): _NOT_ROUTED.format("StableLmForCausalLM") for m in PREFIX},
    **{("t5", m): "not supported on encoder-decoder models like T5ForConditionalGeneration" for m in PREFIX},
}


def _forward(model, kind, method):
    """A padded batch (decoders left-padded with position ids, as ``generate`` pads) through the model."""
    ids, mask = batch([6, 3], "left" if kind == "decoder" else "right")
    kw = dict(input_ids=ids, attention_mask=mask)
    if kind == "decoder":
        kw["position_ids"] = positions(mask)
    if kind == "seq2seq":
        kw["decoder_input_ids"] = torch.arange(3, 7).repeat(2, 1)
    with torch.no_grad():
        out = model(**kw)
    x = out.logits if hasattr(out, "logits") else out.last_hidden_state
    grows = method not in PREFIX and kind != "seq2seq"  # prompt methods lengthen the (encoder's) output by m
    want = ids.shape[1] + (METHODS[method]().num_virtual_tokens if grows else 0)
    seq = 4 if kind == "seq2seq" else want
    assert x.shape[:2] == (2, seq), f"output {list(x.shape)}"
    assert bool(torch.isfinite(x).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_runs_a_padded_forward_or_is_refused_at_apply(family):
    build, kind = _families()[family]
    torch.manual_seed(0)
    with warnings.catch_warnings():  # tiny configs trip transformers' special-token range warnings
        warnings.simplefilter("ignore")
        model = build().double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    impl = model.config._attn_implementation
    for method in METHOD_IDS:
        refusal = REFUSED.get((family, method))
        if refusal is None:
            fastprefix.apply(model, METHODS[method]())
            try:
                _forward(model, kind, method)
            finally:
                fastprefix.remove(model)
        else:
            with pytest.raises(ValueError, match=refusal):
                fastprefix.apply(model, METHODS[method]())
        # refused or removed: the model is as it was
        assert not hasattr(model, "fastprefix") and model.config._attn_implementation == impl
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), (family, method)


def test_the_refusal_table_names_only_known_cells():
    assert {f for f, _ in REFUSED} <= set(FAMILIES) and {m for _, m in REFUSED} <= set(METHOD_IDS)


@pytest.mark.parametrize("method", PREFIX)
def test_distilbert_takes_the_prefix_exactly(method):
    """DistilBERT's attention has no ``layer_idx`` (the old finder's refusal): it is reached now, so check that
    the prefix is really applied (outputs move) and padding stays exact (a padded row equals the row alone)."""
    from hf_models import perturb

    build, _ = _families()["distilbert"]
    torch.manual_seed(0)
    model = build().double().eval()
    ids, mask = batch([6, 3])
    with torch.no_grad():
        base = model(input_ids=ids, attention_mask=mask).last_hidden_state
        perturb(fastprefix.apply(model, METHODS[method]()))
        padded = model(input_ids=ids, attention_mask=mask).last_hidden_state
        alone = model(input_ids=ids[1:, :3]).last_hidden_state
    assert (padded - base).abs().max() > 1e-2
    torch.testing.assert_close(padded[1, :3], alone[0], atol=1e-10, rtol=0)
