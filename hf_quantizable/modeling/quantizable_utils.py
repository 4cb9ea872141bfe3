"""What every quantizable `PreTrainedModel` adds to its stock base class.

Self-contained: torch, transformers and relative imports only.
"""

import torch
from transformers import initialization as init

from .attention import AttentionGate
from .int8 import convert_to_int8


class QuantizableModelMixin:
    """`auto_map` for remote code, gate initialisation from `pi_init`, INT8 rebuild on load.

    Mixed in before the stock `*PreTrainedModel`; subclasses set `auto_map`.
    """

    auto_map: dict[str, str] = {}
    _can_record_outputs = None
    # The losses are per-batch means that ignore `num_items_in_batch`: Trainer must scale them itself.
    accepts_loss_kwargs = False

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        config.auto_map = dict(self.auto_map)

    def post_init(self):
        super().post_init()
        if self.config.w8a8_config:
            convert_to_int8(self, self.config.w8a8_config)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AttentionGate):
            std = getattr(self.config, "initializer_range", None) or self.config.init_std
            module.init_gate(init, std)
