"""A BERT sentence encoder on the digits sentences of data.py: Hugging Face transformers' BertModel built
from a config (no download), mean-pooled over the attention mask into one embedding per sentence.

Pretrained encoders carry a few hidden channels whose LayerNorm outputs are 10-100x larger than the
rest; a model trained briefly from scratch does not. `build(outliers=...)` plants them the way they
appear in pretrained models: the LayerNorm weights and biases of a few channels are scaled up in every
layer before training, so training adapts the rest of the network to them (train.py).
"""

from __future__ import annotations

import torch
from torch import nn

LENGTH, VOCAB, POSITIONS = 64, 18, 65  # data.py's sentences (this file is loaded by path, so it imports nothing local)
OUTLIER_CHANNELS = (17, 101, 222)


class Encoder(nn.Module):
    """(input_ids, position_ids, attention_mask), each (N, 64) int64 -> (logits (N, 10), embedding (N, hidden)): the mean-pooled
    sentence embedding over the attention mask, and a linear classifier's answer on it."""

    def __init__(self, hidden: int = 256, layers: int = 4, heads: int = 4, intermediate: int = 1024) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=intermediate, max_position_embeddings=POSITIONS, type_vocab_size=1,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        self.bert = BertModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(hidden, 10)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.bert(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        embedding = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.classifier(embedding), embedding


def plant_outliers(encoder: Encoder, scale: float = 2.0, channels: tuple[int, ...] = OUTLIER_CHANNELS) -> None:
    """Scale the LayerNorm weight and bias of `channels` in every LayerNorm, as pretrained encoders have them."""
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, nn.LayerNorm):
                for i, channel in enumerate(channels):
                    module.weight[channel] = scale * (1.0 + 0.5 * i)
                    module.bias[channel] = 0.25 * scale


def build(outliers: bool = False) -> Encoder:
    torch.manual_seed(0)
    encoder = Encoder()
    if outliers:
        plant_outliers(encoder)
    return encoder
