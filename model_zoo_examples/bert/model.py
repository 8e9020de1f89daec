"""BERT encoder with the pretraining heads: masked LM (tied to the word embeddings) and next sentence.

Post-LayerNorm Transformer as in Devlin et al. (2018). Parameter names contain `layernorm` and
`bias` where BERT excludes weight decay, so `mindspore_lamb.groups.bert_param_groups` finds them.
Dropout masks are a hash of (seed, training call, dropout site, element), the call counted in a Parameter
that checkpoints save: a resumed run draws the masks of an uninterrupted one (docs/resume.md), which
`nn.Dropout` cannot do (its kernel's random state lives outside every checkpoint).
"""
import math
from dataclasses import dataclass, fields

import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops
from mindspore.common.initializer import TruncatedNormal, initializer


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    initializer_range: float = 0.02
    dropout_seed: int = 0

    @classmethod
    def from_dict(cls, d):
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


_U32 = ms.uint32


def _mix(x):
    """lowbias32 (C. Wellons): a bijective 32-bit integer hash with full avalanche, elementwise on uint32."""
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, Tensor(16, _U32)))
    x = x * Tensor(0x7FEB352D, _U32)
    x = ops.bitwise_xor(x, ops.bitwise_right_shift(x, Tensor(15, _U32)))
    x = x * Tensor(0x846CA68B, _U32)
    return ops.bitwise_xor(x, ops.bitwise_right_shift(x, Tensor(16, _U32)))


class DropoutKey(nn.Cell):
    """Counts training calls in the Parameter `dropout_calls` (saved with the weights) and returns this
    call's uint32 key for the model's `StatelessDropout`s; eval calls count nothing."""

    def __init__(self, seed):
        super().__init__()
        self.seed = Tensor(seed % (1 << 32), _U32)
        self.calls = Parameter(Tensor(0, _U32), name="dropout_calls", requires_grad=False)

    def construct(self):
        if not self.training:
            return self.seed
        calls = self.calls + Tensor(1, _U32)
        return ops.depend(_mix(self.seed ^ _mix(calls)), ops.assign(self.calls, calls))


class StatelessDropout(nn.Cell):
    """Inverted dropout whose mask is a pure function of (key, site, element index): element i is kept when
    mix(i ^ mix(key + site)) >= p * 2^32. `site` tells the model's dropout layers apart."""

    def __init__(self, p, site):
        super().__init__()
        self.p = p
        self.site = Tensor((site * 0x9E3779B9) % (1 << 32), _U32)
        self.threshold = Tensor(min(int(p * (1 << 32)), (1 << 32) - 1), _U32)
        self.scale = 1.0 / (1.0 - p)

    def construct(self, x, key):
        if not self.training or self.p == 0:
            return x
        index = ops.arange(x.size, dtype=ms.int32).astype(_U32).reshape(x.shape)
        keep = _mix(index ^ _mix(key + self.site)) >= self.threshold
        return ops.select(keep, x * self.scale, ops.zeros_like(x))


def _dense(cfg, n_in, n_out):
    return nn.Dense(n_in, n_out, weight_init=TruncatedNormal(cfg.initializer_range), bias_init="zeros")


class Embeddings(nn.Cell):
    def __init__(self, cfg):
        super().__init__()
        init = TruncatedNormal(cfg.initializer_range)
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size, embedding_table=init)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size, embedding_table=init)
        self.position_embeddings = Parameter(initializer(init, (cfg.max_position_embeddings, cfg.hidden_size)),
                                             name="position_embeddings")
        self.layernorm = nn.LayerNorm((cfg.hidden_size,), epsilon=1e-12)
        self.dropout = StatelessDropout(cfg.hidden_dropout_prob, site=0)

    def construct(self, input_ids, segment_ids, key):
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(segment_ids)
        x = x + self.position_embeddings[:seq_len]
        return self.dropout(self.layernorm(x), key)


class SelfAttention(nn.Cell):
    def __init__(self, cfg, site):
        super().__init__()
        h = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, h // cfg.num_attention_heads
        self.query, self.key, self.value, self.output = (_dense(cfg, h, h) for _ in range(4))
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.dropout = StatelessDropout(cfg.attention_probs_dropout_prob, site)

    def _split(self, x):  # [B, L, H] -> [B, heads, L, head_dim]
        b, l, _ = x.shape
        return x.reshape(b, l, self.heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, mask_bias, key):
        b, l, h = x.shape
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        scores = ops.matmul(q, k.transpose(0, 1, 3, 2)) * self.scale + mask_bias
        probs = self.dropout(ops.softmax(scores, axis=-1), key)
        context = ops.matmul(probs, v).transpose(0, 2, 1, 3).reshape(b, l, h)
        return self.output(context)


class EncoderLayer(nn.Cell):
    def __init__(self, cfg, index):
        super().__init__()
        h = cfg.hidden_size
        self.attention = SelfAttention(cfg, site=3 * index + 1)
        self.attention_layernorm = nn.LayerNorm((h,), epsilon=1e-12)
        self.intermediate = _dense(cfg, h, cfg.intermediate_size)
        self.gelu = nn.GELU(approximate=False)
        self.output = _dense(cfg, cfg.intermediate_size, h)
        self.output_layernorm = nn.LayerNorm((h,), epsilon=1e-12)
        self.attention_dropout = StatelessDropout(cfg.hidden_dropout_prob, site=3 * index + 2)
        self.output_dropout = StatelessDropout(cfg.hidden_dropout_prob, site=3 * index + 3)

    def construct(self, x, mask_bias, key):
        x = self.attention_layernorm(x + self.attention_dropout(self.attention(x, mask_bias, key), key))
        return self.output_layernorm(x + self.output_dropout(self.output(self.gelu(self.intermediate(x))), key))


class BertModel(nn.Cell):
    """Embeddings + encoder + pooler: (input_ids, input_mask, segment_ids) -> (sequence_output, pooled)."""

    def __init__(self, cfg):
        super().__init__()
        self.dropout_key = DropoutKey(cfg.dropout_seed)
        self.embeddings = Embeddings(cfg)
        self.layers = nn.CellList([EncoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.pooler = _dense(cfg, cfg.hidden_size, cfg.hidden_size)

    def construct(self, input_ids, input_mask, segment_ids):
        mask_bias = (1.0 - input_mask.astype(ms.float32))[:, None, None, :] * -10000.0
        key = self.dropout_key()
        x = self.embeddings(input_ids, segment_ids, key)
        for layer in self.layers:
            x = layer(x, mask_bias, key)
        return x, ops.tanh(self.pooler(x[:, 0]))


class BertPreTraining(nn.Cell):
    """BERT + MLM head (output matrix = word embedding table) + NSP head.

    Returns (mlm_logits [B, P, vocab] at `masked_lm_positions`, nsp_logits [B, 2]).
    """

    def __init__(self, cfg):
        super().__init__()
        self.bert = BertModel(cfg)
        self.mlm_transform = _dense(cfg, cfg.hidden_size, cfg.hidden_size)
        self.gelu = nn.GELU(approximate=False)
        self.mlm_layernorm = nn.LayerNorm((cfg.hidden_size,), epsilon=1e-12)
        self.mlm_output_bias = Parameter(initializer("zeros", (cfg.vocab_size,)), name="mlm_output_bias")
        self.nsp = _dense(cfg, cfg.hidden_size, 2)

    def construct(self, input_ids, input_mask, segment_ids, masked_lm_positions):
        sequence, pooled = self.bert(input_ids, input_mask, segment_ids)
        b, l, h = sequence.shape
        flat = masked_lm_positions + ops.arange(b, dtype=ms.int32)[:, None] * l
        picked = ops.gather(sequence.reshape(b * l, h), flat.reshape(-1), 0)
        picked = self.mlm_layernorm(self.gelu(self.mlm_transform(picked)))
        table = self.bert.embeddings.word_embeddings.embedding_table
        logits = ops.matmul(picked, table.T) + self.mlm_output_bias
        return logits.reshape(b, masked_lm_positions.shape[1], -1), self.nsp(pooled)


class BertPretrainLoss(nn.Cell):
    """Takes the dataset columns in order, returns the MLM loss (mean over masked tokens) + NSP loss."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def construct(self, input_ids, input_mask, segment_ids, next_sentence_label,
                  masked_lm_positions, masked_lm_ids, masked_lm_weights):
        mlm_logits, nsp_logits = self.network(input_ids, input_mask, segment_ids, masked_lm_positions)
        log_probs = ops.log_softmax(mlm_logits, axis=-1)
        token_nll = -ops.gather_elements(log_probs, 2, masked_lm_ids[..., None]).squeeze(-1)
        mlm_loss = (token_nll * masked_lm_weights).sum() / (masked_lm_weights.sum() + 1e-5)
        nsp_nll = -ops.gather_elements(ops.log_softmax(nsp_logits, axis=-1), 1,
                                       next_sentence_label.reshape(-1, 1))
        return mlm_loss + nsp_nll.mean()


class BertPretrainEval(nn.Cell):
    """Eval network for `Model.eval`: returns predictions and labels for the metrics in evaluate.py."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def construct(self, input_ids, input_mask, segment_ids, next_sentence_label,
                  masked_lm_positions, masked_lm_ids, masked_lm_weights):
        mlm_logits, nsp_logits = self.network(input_ids, input_mask, segment_ids, masked_lm_positions)
        return (mlm_logits.argmax(-1).astype(ms.int32), masked_lm_ids, masked_lm_weights,
                nsp_logits.argmax(-1).astype(ms.int32), next_sentence_label)
