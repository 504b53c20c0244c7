"""Rows of the target's LM head and token embeddings, read from wherever the runner's weights live."""

from __future__ import annotations

import numpy as np


def target_rows(runner, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lm_head[ids], embeddings[ids]) as float32 arrays of shape (len(ids), hidden)."""
    model = getattr(runner, "model", None)
    if model is not None:  # a transformers model in memory
        import torch

        index = torch.as_tensor(np.asarray(ids), dtype=torch.long)
        with torch.no_grad():
            head = model.get_output_embeddings().weight.index_select(0, index.to(model.device))
            embed = model.get_input_embeddings().weight.index_select(0, index.to(model.device))
        return head.float().cpu().numpy(), embed.float().cpu().numpy()
    source = getattr(runner, "source", None)
    if source is None or source.kind != "gguf":
        raise ValueError(f"cannot read the LM head of {runner.name}: neither a transformers model nor a GGUF file")
    return _gguf_rows(source.path, ids)


def _gguf_rows(path, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dequantize only the needed rows: GGUF quantizes each row in its own blocks."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    embed = _rows(tensors["token_embd.weight"], ids)
    head = _rows(tensors["output.weight"], ids) if "output.weight" in tensors else embed  # tied embeddings
    return head, embed


def _rows(tensor, ids: np.ndarray) -> np.ndarray:
    import gguf

    rows = np.asarray(tensor.data)[np.asarray(ids)]
    return np.ascontiguousarray(gguf.quants.dequantize(rows, tensor.tensor_type), dtype=np.float32)
