"""Networks and what runs them: `mathlm.models.build` / `abstract` are the one factory (models/variants.py)."""
from mathlm.models import expand as _expand  # noqa: F401,E402  (registers the Control-LLM `expand` variant)
from mathlm.models import lora as _lora  # noqa: F401,E402  (registers the `lora` variant)
from mathlm.models.variants import abstract, build, init_params, metadata, trainable_filter  # noqa: F401
