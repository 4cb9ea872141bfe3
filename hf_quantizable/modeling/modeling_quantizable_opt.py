"""Quantization-friendly OPT: stock OPT weights and layout, attention from `attention.py`.

Parameter names equal `transformers`' `OPTForCausalLM`, so stock checkpoints load directly (the
gate parameters are new). Every activation the W8A8 setting quantizes passes a `QuantPoint`.
Self-contained: torch, transformers and relative imports only.
"""

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import CrossEntropyLoss
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import OPTPreTrainedModel

from .attention import AttentionCore, causal_mask, eager_attention_forward
from .configuration_quantizable import QuantizableOPTConfig
from .int8 import QuantPoint
from .quantizable_utils import QuantizableModelMixin

# transformers 5.24 renamed the outputs' `past_key_values` field (and the argument) to `cache`.
_CACHE_FIELD = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
# Row of position 0 in OPT's learned positional table (its first two rows are unused, as in metaseq).
POSITION_OFFSET = 2


class QuantizableOPTAttention(nn.Module):
    """Q/K/V projections, KV cache, attention core (softmax variant + gate) and output projection."""

    def __init__(self, config: QuantizableOPTConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.enable_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.enable_bias)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.enable_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.enable_bias)
        for projection in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            projection.torch_default_init = config.attention_init == "torch_default"  # read by `_init_weights`
        self.q_quant = QuantPoint()
        self.k_quant = QuantPoint()
        self.v_quant = QuantPoint()
        self.core = AttentionCore(config, self.num_heads, self.head_dim, config.attention_dropout, is_causal=True)
        self.out_quant = QuantPoint(residual_stream=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        mask: torch.Tensor,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, seq_length, _ = hidden_states.shape
        heads_shape = (batch_size, seq_length, self.num_heads, self.head_dim)
        query = self.q_quant(self.q_proj(hidden_states)).view(heads_shape).transpose(1, 2)  # [B, H, T, d_head]
        key = self.k_quant(self.k_proj(hidden_states)).view(heads_shape).transpose(1, 2)
        value = self.v_quant(self.v_proj(hidden_states)).view(heads_shape).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)  # [B, H, past + T, d_head]
        qkv_quant = (self.q_quant, self.k_quant, self.v_quant)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        context, probs = self.core(
            hidden_states,
            query,
            key,
            value,
            mask,
            attention_interface,
            output_attentions=output_attentions,
            qkv_quant=qkv_quant,
        )
        return self.out_quant(self.out_proj(context)), probs


class QuantizableOPTDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: QuantizableOPTConfig, layer_idx: int):
        super().__init__()
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.self_attn = QuantizableOPTAttention(config, layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(
            config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine
        )
        self.fc1 = nn.Linear(config.hidden_size, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, config.hidden_size, bias=config.enable_bias)
        self.activation_fn = ACT2FN[config.activation_function]
        self.final_layer_norm = nn.LayerNorm(
            config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine
        )
        self.attn_ln_quant = QuantPoint()
        self.attn_residual_quant = QuantPoint(residual_stream=True)
        self.ffn_ln_quant = QuantPoint()
        self.act_quant = QuantPoint()
        self.fc2_quant = QuantPoint(residual_stream=True)
        self.ffn_residual_quant = QuantPoint(residual_stream=True)

    def forward(self, hidden_states, mask, past_key_values=None, output_attentions=False):
        # OPT-125m and most sizes are pre-LN; OPT-350m normalises after the residual (post-LN).
        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.attn_ln_quant(self.self_attn_layer_norm(hidden_states))
        hidden_states, probs = self.self_attn(hidden_states, mask, past_key_values, output_attentions)
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.attn_residual_quant(residual + hidden_states)
        if not self.do_layer_norm_before:
            hidden_states = self.attn_ln_quant(self.self_attn_layer_norm(hidden_states))

        residual = hidden_states
        if self.do_layer_norm_before:
            hidden_states = self.ffn_ln_quant(self.final_layer_norm(hidden_states))
        hidden_states = self.act_quant(self.activation_fn(self.fc1(hidden_states)))  # [B, T, d_ff]
        hidden_states = self.fc2_quant(self.fc2(hidden_states))
        hidden_states = nn.functional.dropout(hidden_states, p=self.dropout, training=self.training)
        hidden_states = self.ffn_residual_quant(residual + hidden_states)
        if not self.do_layer_norm_before:
            hidden_states = self.ffn_ln_quant(self.final_layer_norm(hidden_states))
        return hidden_states, probs


class QuantizableOPTPreTrainedModel(QuantizableModelMixin, OPTPreTrainedModel):
    config_class = QuantizableOPTConfig
    config: QuantizableOPTConfig
    base_model_prefix = "model"
    _no_split_modules = ["QuantizableOPTDecoderLayer"]
    auto_map = {
        "AutoConfig": "configuration_quantizable.QuantizableOPTConfig",
        "AutoModel": "modeling_quantizable_opt.QuantizableOPTModel",
        "AutoModelForCausalLM": "modeling_quantizable_opt.QuantizableOPTForCausalLM",
    }
    # Family knowledge generic code reads (see `QuantizableModelMixin`).
    _layer_paths = ("decoder.layers",)
    # The official choices: attention output, FFN output, layer output, both LayerNorm outputs, final LayerNorm.
    _outlier_hook_points = (
        {"kind": "attn_output", "paths": (("self_attn.out_quant", "output"), ("self_attn.out_proj", "output"))},
        {"kind": "ffn_output", "paths": (("fc2_quant", "output"), ("fc2", "output"))},
        {"kind": "layer_output", "paths": (("", "output"),)},
        {"kind": "attn_layernorm_output", "paths": (("attn_ln_quant", "output"), ("self_attn_layer_norm", "output"))},
        {"kind": "ffn_layernorm_output", "paths": (("ffn_ln_quant", "output"), ("final_layer_norm", "output"))},
        {
            "kind": "final_layernorm_output",
            "paths": (("decoder.final_ln_quant", "output"), ("decoder.final_layer_norm", "output")),
            "per_layer": False,
        },
    )
    _keep_fp_modules = ("lm_head",)

    _gamma_migration_layer_plan = (
        ("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("final_layer_norm", ("fc1",)),
    )

    @torch.no_grad()
    def _init_weights(self, module):
        if getattr(module, "torch_default_init", False):  # as `nn.Linear.reset_parameters`
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
            return
        super()._init_weights(module)

    def _gamma_migration_plan(self) -> list[tuple[str, list[str], str | None]]:
        if not self.config.do_layer_norm_before:
            raise ValueError("gamma migration supports pre-LayerNorm OPT only (`do_layer_norm_before=True`)")
        return super()._gamma_migration_plan()


class QuantizableOPTDecoder(nn.Module):
    """Token + position embeddings, the decoder layers and the final LayerNorm."""

    def __init__(self, config: QuantizableOPTConfig):
        super().__init__()
        self.config = config
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, self.padding_idx)
        # Stock OPT's `OPTLearnedPositionalEmbedding` table (same parameter name and shape) as a plain
        # `nn.Embedding` looked up at `position_ids + POSITION_OFFSET`, so that W8A8 quantizes it as it
        # does every table (`quantize_embeddings`; the official `QuantizedOPTLearnedPositionalEmbedding`).
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, config.hidden_size)
        different_width = config.word_embed_proj_dim != config.hidden_size
        self.project_out = (
            nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if different_width else None
        )
        self.project_in = (
            nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if different_width else None
        )
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(
                config.hidden_size, elementwise_affine=config.layer_norm_elementwise_affine
            )
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList(
            [QuantizableOPTDecoderLayer(config, layer_idx=i) for i in range(config.num_hidden_layers)]
        )
        self.embed_quant = QuantPoint(residual_stream=True)
        self.final_ln_quant = QuantPoint()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool = False,
        output_hidden_states: bool = False,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)  # [B, T, d_embed]
        batch_size, seq_length = inputs_embeds.shape[:2]
        if self.training and torch.is_grad_enabled() and any(layer.gradient_checkpointing for layer in self.layers):
            # the backward pass replays each layer, which would extend the cache a second time
            use_cache, past_key_values = False, None
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        # attention_mask covers past + current tokens: [B, past + T]
        full_mask = attention_mask
        if full_mask is None:
            full_mask = torch.ones(batch_size, past_length + seq_length, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = (torch.cumsum(full_mask, dim=1) * full_mask - 1).long()[:, past_length:]  # [B, T]
        mask = causal_mask(attention_mask, batch_size, seq_length, past_length, inputs_embeds.device)

        if self.project_in is not None:
            inputs_embeds = self.project_in(inputs_embeds)
        positions = self.embed_positions(position_ids + POSITION_OFFSET).to(inputs_embeds.dtype)  # [B, T, D]
        hidden_states = self.embed_quant(inputs_embeds + positions)

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            hidden_states, probs = layer(
                hidden_states, mask, past_key_values=past_key_values, output_attentions=output_attentions
            )
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            if output_attentions:
                all_attentions += (probs,)
        if self.final_layer_norm is not None:
            hidden_states = self.final_ln_quant(self.final_layer_norm(hidden_states))
        if self.project_out is not None:
            hidden_states = self.project_out(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
            **{_CACHE_FIELD: past_key_values if use_cache else None},
        )


class QuantizableOPTModel(QuantizableOPTPreTrainedModel):
    """OPT decoder with quantization-friendly attention."""

    def __init__(self, config: QuantizableOPTConfig):
        super().__init__(config)
        self.decoder = QuantizableOPTDecoder(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.decoder.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        outputs = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache if past_key_values is None else past_key_values,  # `cache`: transformers >= 5.24
            inputs_embeds=inputs_embeds,
            use_cache=self.config.use_cache if use_cache is None else use_cache,
            position_ids=position_ids,
            output_attentions=self.config.output_attentions if output_attentions is None else output_attentions,
            output_hidden_states=(
                self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
            ),
        )
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return outputs if return_dict else outputs.to_tuple()


class QuantizableOPTForCausalLM(QuantizableOPTPreTrainedModel, GenerationMixin):
    _evaluation_task = "clm"
    _training_objective = "clm"
    _tied_weights_keys = {"lm_head.weight": "model.decoder.embed_tokens.weight"}

    def __init__(self, config: QuantizableOPTConfig):
        super().__init__(config)
        self.model = QuantizableOPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.model.decoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        position_ids: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        cache: Cache | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            past_key_values=cache if past_key_values is None else past_key_values,  # `cache`: transformers >= 5.24
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            position_ids=position_ids,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states)  # [B, T, vocab]
        loss = None
        if labels is not None:
            # next-token prediction: position t predicts token t + 1
            shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1])
            shift_labels = labels[:, 1:].reshape(-1).to(logits.device)
            loss = CrossEntropyLoss()(shift_logits, shift_labels)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output = CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{_CACHE_FIELD: getattr(outputs, _CACHE_FIELD)},
        )
        return output if return_dict else output.to_tuple()


QuantizableOPTConfig.register_for_auto_class()
QuantizableOPTModel.register_for_auto_class("AutoModel")
QuantizableOPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")
