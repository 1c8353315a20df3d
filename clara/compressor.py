"""Document -> memory vectors, and the MSE alignment loss of the compressor.

The compressor is the base decoder itself with the encoder adapter active. It reads
`<ENC> BOS document EOS` (left padded) followed by the n_mem memory tokens
(clara.prompts.encoder_inputs); the final hidden states (after the last norm) at the memory
positions are the document's memory vectors [n_mem, hidden].

Alignment (paper, Sec. 3.1): the mean of a document's memory states should sit where the mean of
its token states sits, so the memory vectors stay in the space the decoder reads. Both means are
taken over real positions only (the attention mask); the loss is the squared difference averaged
over documents and hidden units.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from clara.decoder import Decoder
from clara.prompts import EncoderBatch


@dataclass
class Compressed:
    memory: torch.Tensor  # [N, n_mem, hidden]
    mse_loss: torch.Tensor | None  # scalar, when asked for


def gather_positions(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """hidden [N, L, E], positions [N, m] -> [N, m, E]."""
    index = positions.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def alignment_loss(hidden: torch.Tensor, attention_mask: torch.Tensor, memory_positions: torch.Tensor
                   ) -> torch.Tensor:
    """MSE between the mean non-memory state and the mean memory state of each document.

    hidden [N, L, E]; attention_mask [N, L] (1 = real token); memory_positions [N, m].
    """
    real = attention_mask.bool()
    is_memory = torch.zeros_like(real)
    is_memory.scatter_(1, memory_positions, True)
    text = real & ~is_memory
    memory = real & is_memory
    hidden = hidden.float()  # the means and the loss in fp32, whatever the model's dtype
    text_mean = (hidden * text.unsqueeze(-1)).sum(1) / text.sum(1, keepdim=True)  # [N, E]
    memory_mean = (hidden * memory.unsqueeze(-1)).sum(1) / memory.sum(1, keepdim=True)  # [N, E]
    return F.mse_loss(memory_mean, text_mean)


def compress(decoder: Decoder, embed: Callable[[torch.Tensor], torch.Tensor], batch: EncoderBatch,
             with_mse: bool = False) -> Compressed:
    """Run the compressor over a batch of encoder inputs; the caller chooses the adapter.

    `embed` maps ids to input embeddings (Clara.embed, which holds the trainable memory-token rows).
    """
    embeds = embed(batch.input_ids)
    out = decoder(inputs_embeds=embeds, attention_mask=batch.attention_mask, compute_logits=False)
    memory = gather_positions(out.hidden_states, batch.memory_positions)
    mse = alignment_loss(out.hidden_states, batch.attention_mask, batch.memory_positions) if with_mse else None
    return Compressed(memory=memory, mse_loss=mse)
