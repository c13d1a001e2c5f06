"""Models: choose target and draft (folder, hub id or the local HF cache), device and dtype, and load with progress."""

from __future__ import annotations

import html

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine import hub
from engine.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig
from engine.errors import HelixError
from engine.loader import model_id
from helix_desktop.bridge import EngineBridge
from helix_desktop.doctor_run import DoctorRun
from helix_desktop.download_panel import DownloadPanel
from helix_desktop.formatting import format_bytes
from helix_desktop.model_catalog import cached_models, demo_pair_present
from helix_desktop.settings import AppSettings
from helix_desktop.status_bar import DEVICE_WORDS, device_words

DEVICES = ("auto", "cpu", "cuda", "directml", "mps")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class ModelPicker(QWidget):
    """An editable field (folder path or hub id) with a folder browser."""

    def __init__(self, placeholder: str, parent: QWidget | None = None):
        super().__init__(parent)
        self.combo = QComboBox()
        self.combo.setEditable(True)
        self.combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.combo.lineEdit().setPlaceholderText(placeholder)
        self.combo.setMinimumContentsLength(24)
        self.combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        browse = QPushButton("Folder…")
        browse.setToolTip("Pick a local model folder (with config.json)")
        browse.clicked.connect(self._browse)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.combo, 1)
        layout.addWidget(browse)

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Choose a model folder", self.text() or "")
        if folder:
            self.set_text(folder)

    def text(self) -> str:
        return self.combo.currentText().strip()

    def set_text(self, text: str) -> None:
        self.combo.setCurrentText(text)

    def set_choices(self, names: list[str]) -> None:
        current = self.text()
        self.combo.clear()
        self.combo.addItems(names)
        self.combo.setCurrentText(current)


class ModelsTab(QWidget):
    message = Signal(str, str)

    def __init__(self, bridge: EngineBridge, settings: AppSettings, parent: QWidget | None = None):
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings

        # --- what is loaded now
        self.loaded = QLabel("No models loaded.")
        self.loaded.setTextFormat(Qt.TextFormat.RichText)
        self.loaded.setWordWrap(True)
        self.loaded.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.advice = QLabel("")
        self.advice.setWordWrap(True)
        self.doctor = DoctorRun(self)
        self.doctor.finished.connect(self._on_doctor)
        self.doctor_button = QPushButton("Check drafting methods (doctor)")
        self.doctor_button.setToolTip("Measure each drafting method (draft model, n-gram lookup, EAGLE head) on the "
                                      "loaded models in a separate process: acceptance, cost per drafted token, "
                                      "predicted and measured speed-up; recommend a method and K "
                                      "(python main.py doctor)")
        self.doctor_button.clicked.connect(self.run_doctor)
        self.doctor_result = QLabel("")
        self.doctor_result.setWordWrap(True)
        self.doctor_result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        loaded_box = QGroupBox("In use now")
        lb = QVBoxLayout(loaded_box)
        lb.addWidget(self.loaded)
        lb.addWidget(self.advice)
        doctor_row = QHBoxLayout()
        doctor_row.addWidget(self.doctor_button)
        doctor_row.addWidget(self.doctor_result, 1)
        lb.addLayout(doctor_row)

        # --- choose
        self.target = ModelPicker("folder or hub id, e.g. HuggingFaceTB/SmolLM2-360M")
        self.draft = ModelPicker("folder or hub id of a small model with the same tokenizer")
        self.no_draft = QCheckBox("No draft model (plain decoding only)")
        self.no_draft.toggled.connect(lambda on: self.draft.setEnabled(not on))
        self.device = QComboBox()
        for d in DEVICES:
            self.device.addItem("Automatic (DirectML, CUDA, MPS, then CPU)" if d == "auto" else DEVICE_WORDS[d], d)
        self.dtype = QComboBox()
        for d in DTYPES:
            self.dtype.addItem("Automatic (the checkpoint's bf16/fp16 on GPU, float32 on CPU)" if d == "auto" else d, d)
        self.kv_tokens = QSpinBox()
        self.kv_tokens.setRange(0, 10_000_000)
        self.kv_tokens.setSingleStep(1024)
        self.kv_tokens.setSpecialValueText("Automatic (from device memory)")
        self.load_button = QPushButton("Load models")
        self.load_button.setObjectName("primary")
        self.load_button.clicked.connect(self.load_chosen)
        demo_button = QPushButton("Use the demo pair")
        demo_button.clicked.connect(self.choose_demo)
        self.progress = QProgressBar()
        self.progress.setRange(0, 100)
        self.progress.setTextVisible(True)
        self.progress.hide()
        self.stage = QLabel("")
        self.stage.setObjectName("hint")

        choose_box = QGroupBox("Choose models")
        form = QFormLayout(choose_box)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        form.addRow("Target", self.target)
        form.addRow("Draft", self.draft)
        form.addRow("", self.no_draft)
        form.addRow("Device", self.device)
        form.addRow("Precision", self.dtype)
        form.addRow("KV cache", self.kv_tokens)
        buttons = QHBoxLayout()
        buttons.addWidget(self.load_button)
        buttons.addWidget(demo_button)
        buttons.addStretch(1)
        form.addRow(buttons)
        form.addRow(self.progress)
        form.addRow(self.stage)

        # --- cache list
        self.cache_list = QListWidget()
        self.cache_list.itemDoubleClicked.connect(lambda item: self.target.set_text(item.data(Qt.ItemDataRole.UserRole)))
        self.cache_note = QLabel("")
        self.cache_note.setWordWrap(True)
        self.cache_note.setObjectName("hint")
        as_target = QPushButton("Use as target")
        as_target.clicked.connect(lambda: self._use_cached(self.target))
        as_draft = QPushButton("Use as draft")
        as_draft.clicked.connect(lambda: self._use_cached(self.draft))
        refresh = QPushButton("Rescan")
        refresh.clicked.connect(self.scan_cache)
        cache_box = QWidget()
        cl = QVBoxLayout(cache_box)
        cl.addWidget(self.cache_list, 1)
        cl.addWidget(self.cache_note)
        cache_buttons = QHBoxLayout()
        cache_buttons.addWidget(as_target)
        cache_buttons.addWidget(as_draft)
        cache_buttons.addStretch(1)
        cache_buttons.addWidget(refresh)
        cl.addLayout(cache_buttons)

        # --- get models: download from the hub, or pick from the local cache
        self.downloads = DownloadPanel()
        self.downloads.message.connect(self.message)
        self.downloads.downloaded.connect(self._on_downloaded)
        self.sources = QTabWidget()
        self.sources.addTab(self.downloads, "Download")
        self.sources.addTab(cache_box, "Local cache")
        self.downloads.offline.connect(lambda _reason: self.sources.setCurrentWidget(cache_box))
        if hub.is_offline():
            self.sources.setCurrentWidget(cache_box)

        left = QVBoxLayout()
        left.addWidget(loaded_box)
        left.addWidget(choose_box)
        left.addStretch(1)
        layout = QHBoxLayout(self)
        layout.addLayout(left, 3)
        layout.addWidget(self.sources, 2)

        self._scanned = False
        self.load_settings()
        bridge.progress.connect(self._on_progress)
        bridge.state_changed.connect(self._on_state)

    # ---------------------------------------------------------------- choices
    def load_settings(self) -> None:
        s = self.settings
        self.target.set_text(s.get_str("models/target", str(DEMO_TARGET)))
        self.draft.set_text(s.get_str("models/draft", str(DEMO_DRAFT)))
        self.no_draft.setChecked(s.get_bool("models/no_draft", False))
        self.device.setCurrentIndex(max(0, self.device.findData(s.get_str("models/device", "auto"))))
        self.dtype.setCurrentIndex(max(0, self.dtype.findData(s.get_str("models/dtype", "auto"))))
        self.kv_tokens.setValue(s.get_int("models/kv_cache_tokens", 0, 0, 10_000_000))

    def show_config(self, config: EngineConfig) -> None:
        self.target.set_text(config.target)
        self.draft.set_text(config.draft or "")
        self.no_draft.setChecked(config.draft is None)
        self.device.setCurrentIndex(max(0, self.device.findData(config.device)))
        self.dtype.setCurrentIndex(max(0, self.dtype.findData(config.dtype or "auto")))
        self.kv_tokens.setValue(config.kv_cache_tokens or 0)

    def chosen_config(self) -> EngineConfig:
        """The form as an EngineConfig; raises InvalidRequest for impossible values."""
        dtype = self.dtype.currentData()
        return EngineConfig(
            target=self.target.text(),
            draft=None if self.no_draft.isChecked() or not self.draft.text() else self.draft.text(),
            device=self.device.currentData(),
            dtype=None if dtype == "auto" else dtype,
            kv_cache_tokens=self.kv_tokens.value() or None,
        )

    def choose_demo(self) -> None:
        self.target.set_text(str(DEMO_TARGET))
        self.draft.set_text(str(DEMO_DRAFT))
        self.no_draft.setChecked(False)
        if not demo_pair_present():
            self.message.emit("warning", "The demo models are not installed in this copy of Helix "
                              f"({DEMO_TARGET} is missing). Choose a model folder or a hub id instead.")

    def load_chosen(self) -> None:
        if not self.target.text():
            self.message.emit("error", "Choose a target model first: a local folder or a Hugging Face hub id.")
            return
        try:
            config = self.chosen_config()
        except HelixError as exc:
            self.message.emit("error", str(exc))
            return
        self.bridge.load(config)

    def _use_cached(self, picker: ModelPicker) -> None:
        item = self.cache_list.currentItem()
        if item is not None and item.data(Qt.ItemDataRole.UserRole):
            picker.set_text(item.data(Qt.ItemDataRole.UserRole))

    def scan_cache(self) -> None:
        self._scanned = True
        models, note = cached_models()
        self.cache_list.clear()
        for m in models:
            item = QListWidgetItem(f"{m.repo_id}   ({format_bytes(m.size_on_disk)})")
            # the snapshot folder loads without the network; the list shows the hub id it is named by
            item.setData(Qt.ItemDataRole.UserRole, m.snapshot or m.repo_id)
            self.cache_list.addItem(item)
        names = [m.repo_id for m in models]
        if demo_pair_present():
            names = [str(DEMO_TARGET), str(DEMO_DRAFT), *names]
        self.target.set_choices(names)
        self.draft.set_choices(names)
        if note:
            self.cache_note.setText(note)
        elif not models:
            self.cache_note.setText("No models in the Hugging Face cache yet. Download one on the Download tab "
                                    "while online (or with `hf download <model id>`), or pick a local folder.")
        else:
            self.cache_note.setText("Double-click a model to use it as the target.")

    def showEvent(self, event) -> None:  # noqa: N802
        super().showEvent(event)
        if not self._scanned:
            self.scan_cache()
        self.refresh_info()

    def _on_downloaded(self, role: str, folder: str) -> None:
        """A finished download fills the Target or Draft field; Load models then uses it."""
        picker = self.target if role == "target" else self.draft
        picker.set_text(folder)
        if role == "draft":
            self.no_draft.setChecked(False)
        self.scan_cache()
        self.message.emit("info", f"Downloaded {model_id(folder)}; it is set as the {role}. Press Load models to "
                          "use it.")

    # ---------------------------------------------------------------- loading
    def _on_progress(self, stage: str, frac: float) -> None:
        self.progress.show()
        self.progress.setValue(int(frac * 100))
        self.stage.setText(stage)

    def _on_state(self, state: str, reason: str) -> None:
        loading = state == "loading"
        self.load_button.setEnabled(not loading)
        self.load_button.setText("Loading…" if loading else "Load models")
        if loading:
            self.progress.show()
            self.progress.setValue(0)
            current = self.bridge.host.worker is not None
            self.stage.setText("Starting…" + ("  The current models stay usable while the new ones load." if current
                                             else ""))
        else:
            self.progress.hide()
            self.stage.setText("Last load failed; see the message above." if reason else "")
        self.refresh_info()

    def run_doctor(self) -> None:
        config = self.bridge.host.config
        if config is None:
            return
        self.doctor_button.setEnabled(False)
        self.doctor_result.setText("Measuring each drafting method in a separate process (it loads the models "
                                   "again)…")
        self.doctor.start(config)

    def _on_doctor(self, report, message: str) -> None:
        self.doctor_button.setEnabled(self._doctor_possible())
        if report is None:
            self.doctor_result.setText("")
            self.message.emit("error", f"Pair check: {message}")
            return
        method, k = report.get("recommended_method"), report.get("recommended_k")
        choice = ("none (plain decoding)" if not method else "auto, adaptive K" if method == "auto" else
                  f"{method}, K = {k}")
        self.doctor_result.setText(f"<b>Doctor:</b> {html.escape(message)} <b>Recommended:</b> {choice}, measured "
                                   f"{report.get('measured_speedup', 1.0):.2f}× plain.")

    def _doctor_possible(self) -> bool:
        config = self.bridge.host.config
        return config is not None and not self.doctor.running

    def refresh_info(self) -> None:
        engine = self.bridge.host.engine
        self.doctor_button.setEnabled(self._doctor_possible())
        if engine is None:
            self.loaded.setText("No models loaded.")
            self.advice.setText("")
            return
        info = engine.info()
        device = device_words(info)
        draft = info["draft"] if info["has_draft"] else "none (plain decoding only)"
        eagle = f"<br><b>EAGLE head</b> {info['eagle']}" if info.get("eagle") else ""
        methods = ", ".join(m for m in info.get("draft_methods", ()) if m != "auto")
        self.loaded.setText(
            f"<b>Target</b> {info['target']}<br><b>Draft</b> {draft}{eagle}<br>"
            f"<b>Drafting methods</b> {methods} (auto picks among them)<br>"
            f"<b>Device</b> {device} ({info['device_name']}) · <b>Precision</b> {info['dtype']} · "
            f"<b>Context</b> {info['max_context']} tokens")
        worker = self.bridge.host.worker
        snapshot = worker.snapshot() if worker is not None else {}
        kv = snapshot.get("kv", {})
        if kv:
            self.loaded.setText(self.loaded.text() + f"<br><b>KV cache</b> {kv.get('total', 0)} blocks of "
                                f"{kv.get('block_size', 16)} tokens ({format_bytes(kv.get('bytes_allocated', 0))})")
        adaptive = snapshot.get("adaptive", {})
        if info["has_draft"] and adaptive:
            self.advice.setText(
                f"Adaptive draft length currently recommends K = {adaptive.get('recommended_k')} for this pair "
                f"(acceptance prior {adaptive.get('alpha_prior', 0):.2f}, draft costs "
                f"{adaptive.get('draft_cost', 0):.2f} of a target step).")
        else:
            self.advice.setText("")
