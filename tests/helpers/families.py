"""The table of tiny 🤗 model families every model-level test builds from (through :func:`helpers.models.tiny`).

Each family is its real 🤗 class with a config shrunk to hidden 32-48, 1-2 layers and, where the family has it,
grouped-query attention (4 query heads on 2 key/value heads of width 8), so that a test exercises the family's
own embedding, positions, attention and cache code. One vocabulary and pad id for every model. A test that
needs another config passes overrides to ``tiny`` (``tiny("mistral", sliding_window=4)``); the values here are
the ones most tests use.
"""

import dataclasses

VOCAB = 97
PAD = 0
# the windowed families' windows: shorter than the test sequences (6 tokens, + 3 generated), so that a window
# hides keys and a sliding-window KV cache drops its oldest keys while generating
WINDOW = 4


@dataclasses.dataclass(frozen=True)
class Family:
    """``prefix``: transformers' class prefix (``Llama`` -> ``LlamaConfig``, ``LlamaForCausalLM``); ``kind``:
    ``"decoder"``, ``"encoder"`` or ``"seq2seq"`` (the default head: ``"lm"``, ``"base"``, ``"lm"``); ``config``: the
    tiny config; ``dropout``: its dropout fields (what ``tiny(..., dropout=p)`` sets); ``classes``: class names
    that don't follow the prefix + head pattern."""

    prefix: str
    kind: str
    config: dict
    dropout: tuple = ()
    classes: dict = dataclasses.field(default_factory=dict)


_TOKENS = dict(vocab_size=VOCAB, pad_token_id=PAD)
_DECODER = dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                max_position_embeddings=64, bos_token_id=1, eos_token_id=None)
_GQA = dict(_DECODER, num_key_value_heads=2)
_ENCODER = dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=40,
                max_position_embeddings=64)
_T5 = dict(_TOKENS, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, decoder_start_token_id=PAD,
           eos_token_id=None, tie_word_embeddings=False)
_BART = dict(_TOKENS, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, max_position_embeddings=64,
             decoder_start_token_id=PAD, eos_token_id=None)
_ATTENTION_DROPOUT = ("attention_dropout",)
_BERT_DROPOUT = ("hidden_dropout_prob", "attention_probs_dropout_prob")

FAMILIES = {
    # decoders
    "llama": Family("Llama", "decoder", _GQA, _ATTENTION_DROPOUT),
    "qwen2": Family("Qwen2", "decoder", dict(_GQA, hidden_size=48, num_attention_heads=6),  # GQA 6 -> 2, q/k/v biases
                    _ATTENTION_DROPOUT),
    "qwen3": Family("Qwen3", "decoder", dict(_GQA, head_dim=8), _ATTENTION_DROPOUT),  # q/k RMSNorm
    # no sliding window, as Mistral 7B v0.2+ (``sliding_window=WINDOW``: as v0.1)
    "mistral": Family("Mistral", "decoder", dict(_GQA, sliding_window=None), _ATTENTION_DROPOUT),
    "phi3": Family("Phi3", "decoder", _GQA, _ATTENTION_DROPOUT),  # fused qkv and gate_up projections
    # embeddings scaled by sqrt(hidden) inside the embedding module
    "gemma": Family("Gemma", "decoder", dict(_GQA, head_dim=8), _ATTENTION_DROPOUT),
    # + sliding-window layers, attention (a cap low enough to matter) and final soft-capping
    "gemma2": Family("Gemma2", "decoder", dict(_GQA, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                               attn_logit_softcapping=2.0), _ATTENTION_DROPOUT),
    # + q/k norm, one sliding and one full-attention layer
    "gemma3": Family("Gemma3", "decoder", dict(_GQA, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                               layer_types=["sliding_attention", "full_attention"]),
                     _ATTENTION_DROPOUT, classes=dict(config="Gemma3TextConfig", base="Gemma3TextModel")),
    # learned absolute positions, Conv1D projections, no GQA
    "gpt2": Family("GPT2", "decoder", dict(_TOKENS, n_embd=32, n_layer=2, n_head=4, n_inner=40, n_positions=64,
                                           bos_token_id=1, eos_token_id=None),
                   ("resid_pdrop", "embd_pdrop", "attn_pdrop"), classes=dict(lm="GPT2LMHeadModel")),
    "biogpt": Family("BioGpt", "decoder", dict(_DECODER, scale_embedding=True)),  # scales its input embeddings
    "opt": Family("OPT", "decoder", dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=40,
                                         max_position_embeddings=64, word_embed_proj_dim=32, bos_token_id=1,
                                         eos_token_id=None)),
    "falcon": Family("Falcon", "decoder", dict(_TOKENS, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               bos_token_id=1, eos_token_id=None)),
    "gpt-neox": Family("GPTNeoX", "decoder", _DECODER),
    "bloom": Family("Bloom", "decoder", dict(_TOKENS, hidden_size=32, n_layer=2, n_head=4, bos_token_id=1,
                                             eos_token_id=None)),
    "stablelm": Family("StableLm", "decoder", _GQA),
    "granite": Family("Granite", "decoder", _GQA),
    "olmo": Family("Olmo", "decoder", _GQA),
    # encoders
    "bert": Family("Bert", "encoder", _ENCODER, _BERT_DROPOUT),
    # position ids derived from the padding of input_ids
    "roberta": Family("Roberta", "encoder", dict(_ENCODER, max_position_embeddings=70), _BERT_DROPOUT),
    "xlm-roberta": Family("XLMRoberta", "encoder", dict(_ENCODER, max_position_embeddings=70), _BERT_DROPOUT),
    "electra": Family("Electra", "encoder", dict(_ENCODER, embedding_size=16), _BERT_DROPOUT),
    # local and global layers
    "modernbert": Family("ModernBert", "encoder", dict(_ENCODER, local_attention=WINDOW, cls_token_id=1,
                                                       sep_token_id=2)),
    "distilbert": Family("DistilBert", "encoder", dict(_TOKENS, dim=32, n_layers=2, n_heads=4, hidden_dim=40,
                                                       max_position_embeddings=64)),
    # DeBERTa's disentangled attention (c2p and p2c relative terms): v1 with a fused in_proj and q/v biases; v2
    # with its own position projections; v3 (the DebertaV2 classes) with log-bucketed positions, position
    # projections shared with q/k and LayerNorm'd relative embeddings
    "deberta": Family("Deberta", "encoder", dict(_ENCODER, relative_attention=True, pos_att_type="c2p|p2c"),
                      _BERT_DROPOUT),
    "deberta-v2": Family("DebertaV2", "encoder", dict(_ENCODER, relative_attention=True), _BERT_DROPOUT),
    "deberta-v3": Family("DebertaV2", "encoder", dict(_ENCODER, relative_attention=True, position_buckets=8,
                                                      pos_att_type="p2c|c2p", position_biased_input=False,
                                                      norm_rel_ebd="layer_norm", share_att_key=True),
                         _BERT_DROPOUT),
    # encoder-decoders
    "t5": Family("T5", "seq2seq", _T5, ("dropout_rate",)),
    "mt5": Family("MT5", "seq2seq", _T5, ("dropout_rate",)),
    "umt5": Family("UMT5", "seq2seq", _T5, ("dropout_rate",)),  # a position bias in every layer
    "bart": Family("Bart", "seq2seq", _BART, ("dropout",)),
    # scales the ids it embeds, not inputs_embeds
    "pegasus": Family("Pegasus", "seq2seq", dict(_BART, scale_embedding=True), ("dropout",)),
}
