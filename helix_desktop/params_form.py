"""The sampling-parameter form shared by Generate and Compare; builds a validated SamplingParams."""

from __future__ import annotations

import random

from PySide6.QtWidgets import QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QWidget

from engine.config import MAX_DRAFT_TOKENS, MAX_NEW_TOKENS_CAP, SamplingParams
from helix_desktop.settings import AppSettings

ADAPTIVE = "Adaptive"
METHODS = (("Auto", "auto"), ("Draft model", "model"), ("N-gram lookup", "ngram"), ("EAGLE head", "eagle"))


class ParamsForm(QWidget):
    def __init__(self, parent: QWidget | None = None, with_speculative: bool = True, with_method: bool = True):
        super().__init__(parent)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        self.max_new_tokens = QSpinBox()
        self.max_new_tokens.setRange(1, MAX_NEW_TOKENS_CAP)
        self.max_new_tokens.setValue(128)
        self.temperature = QDoubleSpinBox()
        self.temperature.setRange(0.0, 2.0)
        self.temperature.setSingleStep(0.1)
        self.temperature.setValue(0.7)
        self.temperature.setToolTip("0 = greedy (deterministic)")
        self.top_p = QDoubleSpinBox()
        self.top_p.setRange(0.01, 1.0)
        self.top_p.setSingleStep(0.05)
        self.top_p.setValue(1.0)
        self.top_k = QSpinBox()
        self.top_k.setRange(0, 100000)
        self.top_k.setSpecialValueText("off")
        self.seed = QSpinBox()
        self.seed.setRange(-1, 2**31 - 1)
        self.seed.setValue(-1)
        self.seed.setSpecialValueText("random")
        self.speculative = QCheckBox("Speculative decoding")
        self.speculative.setChecked(True)
        self.draft_len = QComboBox()
        self.draft_len.addItem(ADAPTIVE, None)
        for k in range(1, MAX_DRAFT_TOKENS + 1):
            self.draft_len.addItem(str(k), k)
        self.draft_len.setToolTip("Tokens the draft proposes per step; Adaptive picks K from measured acceptance")
        self.draft_method = QComboBox()
        for label, method in METHODS:
            self.draft_method.addItem(label, method)
        self.draft_method.setToolTip("What proposes the draft tokens: the draft model, n-gram lookup (repeats text "
                                     "already in the prompt or reply; needs no draft model), the EAGLE head (one "
                                     "layer over the target's own hidden states, when the target has one), or Auto "
                                     "(the fastest, as measured)")
        form.addRow("Max new tokens", self.max_new_tokens)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Top-k", self.top_k)
        form.addRow("Seed", self.seed)
        if with_speculative:
            form.addRow("", self.speculative)
            self.speculative.toggled.connect(self.draft_len.setEnabled)
        else:
            self.speculative.hide()
        form.addRow("Draft length", self.draft_len)
        if with_method:
            form.addRow("Draft method", self.draft_method)
        else:
            self.draft_method.hide()

    def params(self, speculative: bool | None = None, seed: int | None = None) -> SamplingParams:
        """Validated parameters; raises InvalidRequest with a message fit for the banner."""
        if seed is None:
            seed = self.seed.value() if self.seed.value() >= 0 else None
        return SamplingParams(
            max_new_tokens=self.max_new_tokens.value(),
            temperature=round(self.temperature.value(), 4),
            top_p=round(self.top_p.value(), 4),
            top_k=self.top_k.value(),
            seed=seed,
            speculative=self.speculative.isChecked() if speculative is None else speculative,
            num_draft_tokens=self.draft_len.currentData(),
            draft_method=self.draft_method.currentData(),
        )

    def concrete_seed(self) -> int:
        """The chosen seed, or a fresh random one (Compare needs the same seed for both runs)."""
        return self.seed.value() if self.seed.value() >= 0 else random.randrange(2**31 - 1)

    def set_has_draft(self, has_draft: bool) -> None:
        self.speculative.setEnabled(has_draft)
        self.draft_len.setEnabled(has_draft and (self.speculative.isChecked() or self.speculative.isHidden()))

    def set_methods(self, methods: list[str] | None) -> None:
        """Mark the drafting methods the engine has not loaded (None: a remote, which decides for itself). A choice
        that is not loaded stays chosen, marked: such requests decode plain until it is."""
        items = self.draft_method.model()
        for i, (label, method) in enumerate(METHODS):
            available = methods is None or method in methods
            items.item(i).setEnabled(available)
            self.draft_method.setItemText(i, label if available else f"{label} (not loaded)")

    def load(self, settings: AppSettings, prefix: str) -> None:
        self.max_new_tokens.setValue(settings.get_int(f"{prefix}/max_new_tokens", 128, 1, MAX_NEW_TOKENS_CAP))
        self.temperature.setValue(settings.get_float(f"{prefix}/temperature", 0.7, 0.0, 2.0))
        self.top_p.setValue(settings.get_float(f"{prefix}/top_p", 1.0, 0.01, 1.0))
        self.top_k.setValue(settings.get_int(f"{prefix}/top_k", 0, 0, 100000))
        self.seed.setValue(settings.get_int(f"{prefix}/seed", -1, -1, 2**31 - 1))
        self.speculative.setChecked(settings.get_bool(f"{prefix}/speculative", True))
        k = settings.get_int(f"{prefix}/num_draft_tokens", 0, 0, MAX_DRAFT_TOKENS)
        self.draft_len.setCurrentIndex(k)
        method = settings.get_str(f"{prefix}/draft_method", "auto")
        self.draft_method.setCurrentIndex(max(0, self.draft_method.findData(method)))

    def save(self, settings: AppSettings, prefix: str) -> None:
        settings.set(f"{prefix}/max_new_tokens", self.max_new_tokens.value())
        settings.set(f"{prefix}/temperature", round(self.temperature.value(), 4))
        settings.set(f"{prefix}/top_p", round(self.top_p.value(), 4))
        settings.set(f"{prefix}/top_k", self.top_k.value())
        settings.set(f"{prefix}/seed", self.seed.value())
        settings.set(f"{prefix}/speculative", self.speculative.isChecked())
        settings.set(f"{prefix}/num_draft_tokens", self.draft_len.currentData() or 0)
        settings.set(f"{prefix}/draft_method", self.draft_method.currentData())
