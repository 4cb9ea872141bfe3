"""Quantization-friendly ViT: stock ViT weights, attention from `attention.py`.

Parameter names follow the ViT checkpoint format on disk (`vit.encoder.layer.N.attention.attention.query`,
`intermediate.dense`, `output.dense`, ...), which transformers 4 and 5 both save, so stock ViT
checkpoints load directly (the gate parameters are new). Optionally a LayerNorm follows the patch
embedding (Bondarenko et al.'s ViT setting).
Self-contained: torch, transformers and relative imports only.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.vit.modeling_vit import ViTEmbeddings, ViTPooler, ViTPreTrainedModel

from .attention import AttentionCore, eager_attention_forward
from .configuration_quantizable import QuantizableViTConfig
from .int8 import QuantPoint
from .quantizable_utils import QuantizableModelMixin


class QuantizableViTEmbeddings(ViTEmbeddings):
    """CLS token + patch embeddings (+ optional LayerNorm) + position embeddings, quantized."""

    def __init__(self, config: QuantizableViTConfig, use_mask_token: bool = False):
        super().__init__(config, use_mask_token=use_mask_token)
        self.patch_layernorm = (
            nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if config.patch_embed_layernorm else None
        )
        self.embed_quant = QuantPoint(residual_stream=True)

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool = False,
    ) -> torch.Tensor:
        batch_size, _, height, width = pixel_values.shape
        if not interpolate_pos_encoding and (height, width) != tuple(self.image_size):
            raise ValueError(f"Input image size ({height}*{width}) doesn't match model {tuple(self.image_size)}.")
        embeddings = self.patch_embeddings(pixel_values)  # [B, N, D]
        if self.patch_layernorm is not None:
            embeddings = self.patch_layernorm(embeddings)
        if bool_masked_pos is not None:
            mask = bool_masked_pos.unsqueeze(-1).type_as(embeddings)  # [B, N, 1]
            embeddings = embeddings * (1.0 - mask) + self.mask_token.expand_as(embeddings) * mask
        embeddings = torch.cat((self.cls_token.expand(batch_size, -1, -1), embeddings), dim=1)  # [B, N + 1, D]
        if interpolate_pos_encoding:
            embeddings = embeddings + self.interpolate_pos_encoding(embeddings, height, width)
        else:
            embeddings = embeddings + self.position_embeddings
        return self.dropout(self.embed_quant(embeddings))


class QuantizableViTSelfAttention(nn.Module):
    """Q/K/V projections and the attention core (softmax variant + gate)."""

    def __init__(self, config: QuantizableViTConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.q_quant = QuantPoint()
        self.k_quant = QuantPoint()
        self.v_quant = QuantPoint()
        self.core = AttentionCore(config, self.num_heads, self.head_dim, config.attention_probs_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        batch_size, seq_length, _ = hidden_states.shape
        heads_shape = (batch_size, seq_length, self.num_heads, self.head_dim)
        query = self.q_quant(self.query(hidden_states)).view(heads_shape).transpose(1, 2)  # [B, H, T, d_head]
        key = self.k_quant(self.key(hidden_states)).view(heads_shape).transpose(1, 2)
        value = self.v_quant(self.value(hidden_states)).view(heads_shape).transpose(1, 2)
        qkv_quant = (self.q_quant, self.k_quant, self.v_quant)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return self.core(
            hidden_states,
            query,
            key,
            value,
            None,
            attention_interface,
            output_attentions=output_attentions,
            qkv_quant=qkv_quant,
        )


class QuantizableViTProjection(nn.Module):
    """A linear layer whose output is quantized (attention output projection, FFN output)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)
        self.dense_quant = QuantPoint(residual_stream=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense_quant(self.dense(hidden_states))


class QuantizableViTAttention(nn.Module):
    def __init__(self, config: QuantizableViTConfig):
        super().__init__()
        self.attention = QuantizableViTSelfAttention(config)
        self.output = QuantizableViTProjection(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        context, probs = self.attention(hidden_states, output_attentions)
        return self.output(context), probs


# Copied from hf_quantizable.modeling.modeling_quantizable_bert.QuantizableBertIntermediate with Bert->ViT
class QuantizableViTIntermediate(nn.Module):
    def __init__(self, config: QuantizableViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.intermediate_act_fn = ACT2FN[config.hidden_act]
        self.act_quant = QuantPoint()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.act_quant(self.intermediate_act_fn(self.dense(hidden_states)))  # [B, T, d_ff]


class QuantizableViTLayer(GradientCheckpointingLayer):
    """Pre-LN block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: QuantizableViTConfig):
        super().__init__()
        self.attention = QuantizableViTAttention(config)
        self.intermediate = QuantizableViTIntermediate(config)
        self.output = QuantizableViTProjection(config.intermediate_size, config.hidden_size)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.attn_ln_quant = QuantPoint()
        self.attn_residual_quant = QuantPoint(residual_stream=True)
        self.ffn_ln_quant = QuantPoint()
        self.ffn_residual_quant = QuantPoint(residual_stream=True)

    def forward(self, hidden_states: torch.Tensor, output_attentions: bool = False):
        attention_output, probs = self.attention(
            self.attn_ln_quant(self.layernorm_before(hidden_states)), output_attentions
        )
        hidden_states = self.attn_residual_quant(self.dropout(attention_output) + hidden_states)
        ffn_output = self.output(self.intermediate(self.ffn_ln_quant(self.layernorm_after(hidden_states))))
        return self.ffn_residual_quant(self.dropout(ffn_output) + hidden_states), probs


# Copied from hf_quantizable.modeling.modeling_quantizable_bert.QuantizableBertEncoder with Bert->ViT
class QuantizableViTEncoder(nn.Module):
    def __init__(self, config: QuantizableViTConfig):
        super().__init__()
        self.layer = nn.ModuleList([QuantizableViTLayer(config) for _ in range(config.num_hidden_layers)])


class QuantizableViTPreTrainedModel(QuantizableModelMixin, ViTPreTrainedModel):
    config_class = QuantizableViTConfig
    config: QuantizableViTConfig
    base_model_prefix = "vit"
    _no_split_modules = ["QuantizableViTEmbeddings", "QuantizableViTLayer"]
    auto_map = {
        "AutoConfig": "configuration_quantizable.QuantizableViTConfig",
        "AutoModel": "modeling_quantizable_vit.QuantizableViTModel",
        "AutoModelForImageClassification": "modeling_quantizable_vit.QuantizableViTForImageClassification",
    }
    # Family knowledge generic code reads (see `QuantizableModelMixin`).
    _layer_paths = ("encoder.layer", "layers")  # stock transformers 5 keeps `layers`
    # The official choices: attention output and block output.
    _outlier_hook_points = (
        {
            "kind": "attn_output",
            "paths": (
                ("attention.output.dense_quant", "output"),
                ("attention.output.dense", "output"),
                ("attention.o_proj", "output"),
            ),
        },
        {"kind": "layer_output", "paths": (("", "output"),)},
    )
    _keep_fp_modules = ("pooler", "classifier")

    _gamma_migration_layer_plan = (
        ("layernorm_before", ("attention.attention.query", "attention.attention.key", "attention.attention.value")),
        ("layernorm_after", ("intermediate.dense",)),
    )


class QuantizableViTModel(QuantizableViTPreTrainedModel):
    """ViT encoder with quantization-friendly attention."""

    def __init__(self, config: QuantizableViTConfig, add_pooling_layer: bool = True, use_mask_token: bool = False):
        super().__init__(config)
        self.embeddings = QuantizableViTEmbeddings(config, use_mask_token=use_mask_token)
        self.encoder = QuantizableViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.final_ln_quant = QuantPoint()
        self.pooler = ViTPooler(config) if add_pooling_layer else None
        self.post_init()

    def get_input_embeddings(self):
        return self.embeddings.patch_embeddings

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        bool_masked_pos: torch.BoolTensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        if pixel_values is None:
            raise ValueError("You have to specify pixel_values")
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        hidden_states = self.embeddings(
            pixel_values, bool_masked_pos=bool_masked_pos, interpolate_pos_encoding=bool(interpolate_pos_encoding)
        )  # [B, N + 1, D]
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.encoder.layer:
            hidden_states, probs = layer(hidden_states, output_attentions)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        sequence_output = self.final_ln_quant(self.layernorm(hidden_states))
        pooled_output = self.pooler(sequence_output) if self.pooler is not None else None
        output = BaseModelOutputWithPooling(
            last_hidden_state=sequence_output,
            pooler_output=pooled_output,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


class QuantizableViTForImageClassification(QuantizableViTPreTrainedModel):
    _evaluation_task = "image"
    _training_objective = "image-classification"

    def __init__(self, config: QuantizableViTConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.vit = QuantizableViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels) if config.num_labels > 0 else nn.Identity()
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        interpolate_pos_encoding: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        outputs = self.vit(
            pixel_values,
            interpolate_pos_encoding=interpolate_pos_encoding,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        logits = self.classifier(outputs.last_hidden_state[:, 0, :])  # CLS token: [B, num_labels]
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        output = ImageClassifierOutput(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


QuantizableViTConfig.register_for_auto_class()
QuantizableViTModel.register_for_auto_class("AutoModel")
QuantizableViTForImageClassification.register_for_auto_class("AutoModelForImageClassification")
