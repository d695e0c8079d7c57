"""Methods vLLM adds to its model worker (the engine's `worker_extension_cls`), called by name through
`collective_rpc`: no callable crosses the process boundary, so no insecure serialization is needed."""

from __future__ import annotations

from typing import Any


def _unwrapped(layer: Any) -> Any:
    """The vLLM layer under a LoRA wrapper (with LoRA enabled, the embedding is wrapped)."""
    return getattr(layer, "base_layer", layer)


class WeightsReload:
    """Mixed into vLLM's worker class; `self` is the worker."""

    def reload_weights_keeping_ties(self, weights_path: str) -> bool:
        """vLLM's in-place reload from `weights_path`, then the LM head tied to the input embeddings again where
        the model ties them (SmolLM2, Llama 3.2, Qwen2.5-0.5B). Returns whether it tied them.

        The reload gives the embedding its new tensor but puts the head's old one back (a tied checkpoint has no
        head weights: vLLM warns `ParallelLMHead: Failed to load weights`), which unties them: the engine would
        sample every token through the previous version's head while the trainer scores it through the new one.
        """
        self.reload_weights(weights_path=weights_path, is_checkpoint_format=True)  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        config = self.model_runner.model_config.hf_text_config  # type: ignore[attr-defined]
        head = getattr(model, "lm_head", None)
        if not getattr(config, "tie_word_embeddings", False) or head is None:
            return False
        embedding = getattr(getattr(model, "model", None), "embed_tokens", None)
        if embedding is None:  # serving a head that may be stale would be worse than refusing the swap
            raise RuntimeError(
                f"{type(model).__name__} ties its LM head to its embeddings, but they are not at model.embed_tokens "
                "here, so the head cannot be tied again after an in-place reload; serve this model's versions as "
                "LoRA adapters (trainer.mode: lora, engine.lora_serving: adapter)"
            )
        embedding, head = _unwrapped(embedding), _unwrapped(head)
        head.tie_weights(embedding)
        # The CPU backend computes the head through a kernel packed from its weight when it was processed; the
        # reload left it packed from the old one, so process the head again.
        head.quant_method.process_weights_after_loading(head)
        return head.weight is embedding.weight
