"""Quantization-friendly BERT: stock BERT weights and layout, attention from `attention.py`.

Parameter names equal `transformers`' `BertModel`, so stock checkpoints load directly (the gate
parameters are new). Every activation the W8A8 setting quantizes passes a `QuantPoint`.
Self-contained: torch, transformers and relative imports only.
"""

from collections.abc import Callable

import torch
from torch import nn
from torch.nn import BCEWithLogitsLoss, CrossEntropyLoss, MSELoss
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndCrossAttentions,
    MaskedLMOutput,
    SequenceClassifierOutput,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import (
    BertEmbeddings,
    BertOnlyMLMHead,
    BertPooler,
    BertPreTrainedModel,
)

from .attention import AttentionCore, eager_attention_forward, padding_mask
from .configuration_quantizable import QuantizableBertConfig
from .int8 import QuantPoint
from .quantizable_utils import QuantizableModelMixin


class QuantizableBertEmbeddings(BertEmbeddings):
    """Word + position + token-type embeddings, with the sum and the LayerNorm output quantized.

    As the official `QuantizedBertEmbeddings` (Qualcomm-AI-research/outlier-free-transformers,
    `transformers_language/models/quantized_bert.py`): `(word + token type)` is the partial sum
    `token_type_sum_quant` (`sum_input_token_type_embd_act_quantizer`; a quantization point only
    with `W8A8Config.quantize_embeddings`, `w8a8_option`), `+ position` is `sum_quant`
    (`sum_pos_embd_act_quantizer`). The tables may be INT8 (`int8_embedding.Int8Embedding`, float32
    rows): they are brought to the LayerNorm's dtype.
    """

    def __init__(self, config: QuantizableBertConfig):
        super().__init__(config)
        self.token_type_sum_quant = QuantPoint(residual_stream=True, w8a8_option=("quantize_embeddings", True))
        self.sum_quant = QuantPoint(residual_stream=True)
        self.output_quant = QuantPoint()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        input_shape = input_ids.shape if input_ids is not None else inputs_embeds.shape[:-1]
        seq_length = input_shape[1]
        if position_ids is None:
            position_ids = self.position_ids[:, :seq_length]  # [1, T]
        if token_type_ids is None:
            token_type_ids = self.token_type_ids[:, :seq_length].expand(input_shape)  # [B, T]
        dtype = self.LayerNorm.weight.dtype
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids).to(dtype)  # [B, T, D]
        embeddings = self.token_type_sum_quant(inputs_embeds + self.token_type_embeddings(token_type_ids).to(dtype))
        embeddings = self.sum_quant(embeddings + self.position_embeddings(position_ids).to(dtype))
        embeddings = self.output_quant(self.LayerNorm(embeddings))
        return self.dropout(embeddings)


class QuantizableBertSelfAttention(nn.Module):
    """Q/K/V projections and the attention core (softmax variant + gate)."""

    def __init__(self, config: QuantizableBertConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.query_quant = QuantPoint()
        self.key_quant = QuantPoint()
        self.value_quant = QuantPoint()
        self.core = AttentionCore(config, self.num_heads, self.head_dim, config.attention_probs_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor | None,
        token_mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length, _ = hidden_states.shape
        heads_shape = (batch_size, seq_length, self.num_heads, self.head_dim)
        query = self.query_quant(self.query(hidden_states)).view(heads_shape).transpose(1, 2)  # [B, H, T, d_head]
        key = self.key_quant(self.key(hidden_states)).view(heads_shape).transpose(1, 2)
        value = self.value_quant(self.value(hidden_states)).view(heads_shape).transpose(1, 2)
        qkv_quant = (self.query_quant, self.key_quant, self.value_quant)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return self.core(
            hidden_states, query, key, value, mask, attention_interface, token_mask, output_attentions, qkv_quant
        )


class QuantizableBertResidualOutput(nn.Module):
    """dense -> dropout -> residual sum -> LayerNorm (post-LN BERT), each output quantized."""

    def __init__(self, config: QuantizableBertConfig, in_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.dense_quant = QuantPoint(residual_stream=True)
        self.residual_quant = QuantPoint(residual_stream=True)
        self.output_quant = QuantPoint()

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        hidden_states = self.dropout(self.dense_quant(self.dense(hidden_states)))
        hidden_states = self.residual_quant(hidden_states + input_tensor)
        return self.output_quant(self.LayerNorm(hidden_states))


class QuantizableBertAttention(nn.Module):
    def __init__(self, config: QuantizableBertConfig):
        super().__init__()
        self.self = QuantizableBertSelfAttention(config)
        self.output = QuantizableBertResidualOutput(config, config.hidden_size)

    def forward(self, hidden_states, mask, token_mask, output_attentions=False):
        context, probs = self.self(hidden_states, mask, token_mask, output_attentions)
        return self.output(context, hidden_states), probs


class QuantizableBertIntermediate(nn.Module):
    def __init__(self, config: QuantizableBertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.act_quant = QuantPoint()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act_quant(self.intermediate_act_fn(self.dense(hidden_states)))  # [B, T, d_ff]


class QuantizableBertLayer(GradientCheckpointingLayer):
    def __init__(self, config: QuantizableBertConfig):
        super().__init__()
        self.attention = QuantizableBertAttention(config)
        self.intermediate = QuantizableBertIntermediate(config)
        self.output = QuantizableBertResidualOutput(config, config.intermediate_size)

    def forward(self, hidden_states, mask=None, token_mask=None, output_attentions=False):
        attention_output, probs = self.attention(hidden_states, mask, token_mask, output_attentions)
        return self.output(self.intermediate(attention_output), attention_output), probs


class QuantizableBertEncoder(nn.Module):
    def __init__(self, config: QuantizableBertConfig):
        super().__init__()
        self.layer = nn.ModuleList([QuantizableBertLayer(config) for _ in range(config.num_hidden_layers)])


class QuantizableBertPreTrainedModel(QuantizableModelMixin, BertPreTrainedModel):
    config_class = QuantizableBertConfig
    config: QuantizableBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["QuantizableBertEmbeddings", "QuantizableBertLayer"]
    auto_map = {
        "AutoConfig": "configuration_quantizable.QuantizableBertConfig",
        "AutoModel": "modeling_quantizable_bert.QuantizableBertModel",
        "AutoModelForMaskedLM": "modeling_quantizable_bert.QuantizableBertForMaskedLM",
        "AutoModelForSequenceClassification": "modeling_quantizable_bert.QuantizableBertForSequenceClassification",
    }
    # Family knowledge generic code reads (see `QuantizableModelMixin`).
    _layer_paths = ("encoder.layer",)
    # The official choices: FFN output, the residual sum before the LayerNorm (inf norm only), LayerNorm output.
    _outlier_hook_points = (
        {"kind": "ffn_output", "paths": (("output.dense_quant", "output"), ("output.dense", "output"))},
        {
            "kind": "residual",
            "paths": (("output.residual_quant", "output"), ("output.LayerNorm", "input")),
            "kurtosis": False,
        },
        {"kind": "layernorm_output", "paths": (("output.output_quant", "output"), ("output.LayerNorm", "output"))},
    )
    _keep_fp_modules = ("cls", "pooler", "classifier")
    _retrofit_modules = {"attention_output": "attention.output.dense", "ffn_output": "output.dense"}

    def _gamma_migration_plan(self) -> list[tuple[str, list[str], str | None]]:
        """(LayerNorm, linear layers reading its output, residual module whose shortcut reads it) triples.

        Post-LN: a layer reads the LayerNorm before it (the embeddings' for the first layer) in its Q/K/V
        projections and its attention shortcut; the last layer's output LayerNorm leaves the model and stays.
        """
        prefix = self._base_model_path()
        layers = [f"{prefix}encoder.layer.{i}" for i in range(len(self.base_model.encoder.layer))]
        sources = [f"{prefix}embeddings.LayerNorm"] + [f"{layer}.output.LayerNorm" for layer in layers[:-1]]
        plan = []
        for source, layer in zip(sources, layers):
            qkv = [f"{layer}.attention.self.{p}" for p in ("query", "key", "value")]
            plan.append((source, qkv, f"{layer}.attention.output"))
            plan.append((f"{layer}.attention.output.LayerNorm", [f"{layer}.intermediate.dense"], f"{layer}.output"))
        return plan


class QuantizableBertModel(QuantizableBertPreTrainedModel):
    """BERT encoder with quantization-friendly attention."""

    _evaluation_task = "embedding"

    def __init__(self, config: QuantizableBertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = QuantizableBertEmbeddings(config)
        self.encoder = QuantizableBertEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.word_embeddings

    def set_input_embeddings(self, value):
        self.embeddings.word_embeddings = value

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndCrossAttentions | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict

        hidden_states = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)  # [B, T, D]
        mask = padding_mask(attention_mask, hidden_states.shape[1])  # [B, 1, T, T] or None
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.encoder.layer:
            hidden_states, probs = layer(hidden_states, mask, attention_mask, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        pooled_output = self.pooler(hidden_states) if self.pooler is not None else None

        if not return_dict:
            return tuple(v for v in (hidden_states, pooled_output, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden_states,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class QuantizableBertForMaskedLM(QuantizableBertPreTrainedModel):
    _evaluation_task = "mlm"
    _training_objective = "mlm"
    _tied_weights_keys = {
        "cls.predictions.decoder.weight": "bert.embeddings.word_embeddings.weight",
        "cls.predictions.decoder.bias": "cls.predictions.bias",
    }

    def __init__(self, config: QuantizableBertConfig):
        super().__init__(config)
        self.bert = QuantizableBertModel(config, add_pooling_layer=False)
        self.cls = BertOnlyMLMHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.cls.predictions.decoder

    def set_output_embeddings(self, new_embeddings):
        self.cls.predictions.decoder = new_embeddings
        self.cls.predictions.bias = new_embeddings.bias

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> MaskedLMOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.cls(outputs.last_hidden_state)  # [B, T, vocab]
        loss = None
        if labels is not None:
            loss = CrossEntropyLoss()(logits.view(-1, self.config.vocab_size), labels.view(-1))
        if not return_dict:
            output = (logits, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in ((loss,) + output if loss is not None else output) if v is not None)
        return MaskedLMOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


class QuantizableBertForSequenceClassification(QuantizableBertPreTrainedModel):
    _evaluation_task = "glue"

    def __init__(self, config: QuantizableBertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = QuantizableBertModel(config)
        dropout = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    # Copied from hf_quantizable.modeling.modeling_quantizable_bert.QuantizableBertForMaskedLM.forward with MaskedLMOutput->SequenceClassifierOutput
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.bert(
            input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        # Ignore copy
        logits = self.classifier(self.dropout(outputs.pooler_output))  # [B, num_labels]
        loss = None
        # Ignore copy
        if labels is not None:
            if self.config.problem_type is None:
                if self.num_labels == 1:
                    self.config.problem_type = "regression"
                elif labels.dtype in (torch.long, torch.int):
                    self.config.problem_type = "single_label_classification"
                else:
                    self.config.problem_type = "multi_label_classification"
            if self.config.problem_type == "regression":
                loss = MSELoss()(logits.squeeze(-1), labels.squeeze(-1).to(logits.dtype))
            elif self.config.problem_type == "single_label_classification":
                loss = CrossEntropyLoss()(logits.view(-1, self.num_labels), labels.view(-1))
            else:
                loss = BCEWithLogitsLoss()(logits, labels.to(logits.dtype))
        if not return_dict:
            output = (logits, outputs.hidden_states, outputs.attentions)
            return tuple(v for v in ((loss,) + output if loss is not None else output) if v is not None)
        return SequenceClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )


QuantizableBertConfig.register_for_auto_class()
QuantizableBertModel.register_for_auto_class("AutoModel")
QuantizableBertForMaskedLM.register_for_auto_class("AutoModelForMaskedLM")
QuantizableBertForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
