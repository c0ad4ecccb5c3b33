"""xlstm_hf: the xLSTM of Beck et al. (2024) as a Hugging Face Transformers model.

Importing the package registers `xLSTMConfig` (model_type "xlstm_paper") and our models with the Auto
classes, next to (not instead of) transformers' own `xlstm` model type.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_xlstm import xLSTMConfig
from .modeling_xlstm import xLSTMCache, xLSTMForCausalLM, xLSTMModel, xLSTMPreTrainedModel
from .tokenization import GPT2_TOKENIZER_DIR, load_gpt2_tokenizer

__version__ = "0.1.0"


def _register() -> None:
    # The model_type is ours alone, so AutoConfig needs no exist_ok. The model mappings are keyed by the
    # config class's __name__, which we share with transformers' own xLSTMConfig; exist_ok lets ours in
    # beside theirs (lookups are by class, so theirs still maps to their models).
    try:
        AutoConfig.register(xLSTMConfig.model_type, xLSTMConfig)
    except ValueError:
        pass  # already registered by an earlier import in this process (e.g. importlib.reload)
    AutoModel.register(xLSTMConfig, xLSTMModel, exist_ok=True)
    AutoModelForCausalLM.register(xLSTMConfig, xLSTMForCausalLM, exist_ok=True)
    # Checkpoints that travel: save_pretrained copies configuration_xlstm.py, modeling_xlstm.py and the
    # sibling files they import into the folder and writes config.auto_map, so that
    # `from_pretrained(folder, trust_remote_code=True)` works where xlstm_hf is not installed (the
    # copied files must import only siblings and installed packages: tests/test_hub.py checks it with
    # hub.remote_code_problems). Where xlstm_hf is imported, the classes registered above win.
    xLSTMConfig.register_for_auto_class()
    xLSTMModel.register_for_auto_class("AutoModel")
    xLSTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")


_register()

__all__ = [
    "GPT2_TOKENIZER_DIR",
    "load_gpt2_tokenizer",
    "xLSTMCache",
    "xLSTMConfig",
    "xLSTMForCausalLM",
    "xLSTMModel",
    "xLSTMPreTrainedModel",
]
