"""Incremental detokenization: the text each new token adds, correct across merged BPE
pieces and multi-byte characters, with stop strings held back until they can't match."""

from __future__ import annotations


class IncrementalDetokenizer:
    """Decodes a growing id list window by window (the TGI/vLLM prefix/read offsets)."""

    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids: list[int] = list(prompt_ids[-4:])  # context so the first piece decodes with its leading space
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = stop
        self.text = ""  # all generated text so far (stop strings trimmed at the end)
        self.emitted = 0  # chars of self.text already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> str:
        """Add a token; return the text that can be shown now ("" while held back)."""
        self.ids.append(token_id)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
        return self._release()

    def _release(self) -> str:
        if self.stop:
            for s in self.stop:
                hit = self.text.find(s, max(0, self.emitted - len(s) + 1))
                if hit != -1:
                    self.text = self.text[:hit]
                    self.stopped = True
                    break
        limit = len(self.text)
        if self.stop and not self.stopped:
            # hold back the longest tail that could still grow into a stop string
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if s.startswith(self.text[-k:]):
                        limit = min(limit, len(self.text) - k)
                        break
        limit = max(limit, self.emitted)
        out = self.text[self.emitted : limit]
        self.emitted = limit
        return out

    def flush(self) -> str:
        """At the end of the request: release anything still held back."""
        if self.stopped:
            return ""
        if self.read_offset < len(self.ids):  # ends inside a multi-byte character: keep its bytes as decode() does
            prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
            self.text += self._decode(self.ids[self.prefix_offset :])[len(prefix_text) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        out = self.text[self.emitted :]
        self.emitted = len(self.text)
        return out
