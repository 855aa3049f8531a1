"""GLM-4.5 / 4.6 / 4.7 (transformers ``glm4_moe``): GQA attention with partial RoPE + sigmoid-routed MoE, D MTP modules.

The MTP modules are laid out like DeepSeek-V3's (:class:`~mtp_recipes.families.deepseek_v3.DeepseekV3`): depth d is
one ``Glm4MoeDecoderLayer`` stored as the extra decoder layer ``model.layers.{N+d}``, next to ``enorm``,
``hnorm``, ``eh_proj``, ``shared_head.norm`` and the exported copies ``shared_head.head`` / ``embed_tokens``.
transformers' own class ignores only layers 46 and 92 on load (GLM-4.5-Air's and GLM-4.5's MTP layer); every
layer from N on is an MTP key here, whatever D.

The engines differ in what a depth passes on: vLLM 0.34 and SGLang 0.5.23 recycle the state after
``shared_head.norm`` (the depths train with that), vLLM 0.33 the state before it, which
``python -m mtp_recipes.check`` reports for an export served there.
"""

from __future__ import annotations

from transformers.models.glm4_moe import modeling_glm4_moe as hf

from mtp_recipes.engines import Conventions, EngineRule, at_most
from mtp_recipes.families.base import register
from mtp_recipes.families.deepseek_v3 import DeepseekV3


class Glm4Moe(DeepseekV3):
    name = "glm4_moe"
    title = "GLM-4.5"
    model_types = ("glm4_moe",)
    decoder_layer = hf.Glm4MoeDecoderLayer
    rms_norm = hf.Glm4MoeRMSNorm
    # Both engines feed depth 1 the final-normed backbone state; vLLM zeroes the embedding at position 0, SGLang
    # keeps it; vLLM 0.33 recycled the state before shared_head.norm.
    engine_rules = (
        EngineRule(
            "vllm",
            "0.34.0",
            "vllm/model_executor/models/glm4_moe_mtp.py (Glm4MoeMultiTokenPredictorLayer.forward: shared_head.norm "
            "recycled; Glm4MoeMultiTokenPredictor: layers N .. N+n-1, module step % n; load_weights maps lm_head "
            "and model.embed_tokens onto the first MTP layer, no completeness check)",
            Conventions(h0="normed", passes_on="normed", zero_first_embedding=True),
            fails_on_missing=False,
        ),
        EngineRule(
            "vllm",
            "0.33.0",
            "vllm/model_executor/models/glm4_moe_mtp.py (Glm4MoeMultiTokenPredictorLayer.forward returns the "
            "state before shared_head.norm), vllm/config/speculative.py (use_multi_module_mtp reads "
            "num_nextn_predict_layers)",
            Conventions(h0="normed", passes_on="pre_norm", zero_first_embedding=True),
            multi_module_field="num_nextn_predict_layers",
            fails_on_missing=False,
        ),
        EngineRule(
            "sglang",
            "0.5.23",
            "sglang/srt/models/glm4_moe_nextn.py (Glm4MoeModelNextN: one layer, shared_head.norm on the output, "
            "position 0 kept), sglang/srt/models/glm4_moe.py (load_weights asserts num_nextn_predict_layers == 1)",
            Conventions(h0="normed", passes_on="normed", zero_first_embedding=False),
            config_rules=(at_most("num_nextn_predict_layers", 1, "SGLang serves one GLM-4.5 MTP layer"),),
        ),
    )


register(Glm4Moe())
