"""Fine-tuned interest models (`adapter`, `top_layers:k`, `lora:r`), one module per job:

- `options`: the hyperparameters;
- `episodes`: events -> episodes -> tensors;
- `network`: item vectors and the causal self-attention user encoder;
- `trainer`: optimiser, losses, sampling, the training budget counted in events, rollback;
- `versions`: serving weights, publishing, serialisation;
- `model`: the `InterestModel` facade the worker and the backtest drive.
"""

from models.finetune.episodes import Episode, Target
from models.finetune.model import (
    FineTunedModel,
    adapter_model,
    lora_model,
    profile_text,
    top_layers_model,
)
from models.finetune.network import InterestNet
from models.finetune.options import FineTuneOptions

__all__ = [
    "Episode",
    "FineTuneOptions",
    "FineTunedModel",
    "InterestNet",
    "Target",
    "adapter_model",
    "lora_model",
    "profile_text",
    "top_layers_model",
]
