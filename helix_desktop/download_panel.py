"""Download models from the Hugging Face hub: curated pairs, search (size, architecture, licence), drafts that
share the target's tokenizer, and downloads with progress, cancel and resume. Offline, it says so."""

from __future__ import annotations

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine import hub
from helix_desktop.formatting import format_bytes
from helix_desktop.hub_job import HubJob
from helix_desktop.model_catalog import CURATED_PAIRS

MAX_DRAFT_CANDIDATES = 12
MODEL_ROLE = Qt.ItemDataRole.UserRole  # the HubModel (search results) or CuratedPair (curated list)


def describe(model: hub.HubModel) -> str:
    size = f"{format_bytes(model.size_bytes)}" if model.size_bytes else "size unknown"
    if model.size_bytes and not model.files:
        size = "≈" + size  # estimated from the parameter count until details are fetched
    parts = [model.architecture or "architecture unknown", model.licence or "no licence given", size]
    if model.gated:
        parts.append("gated")
    return model.repo_id + "\n" + "  ·  ".join(parts)


def _list() -> QListWidget:
    """A list of two-line items that elides instead of scrolling sideways."""
    widget = QListWidget()
    widget.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    widget.setTextElideMode(Qt.TextElideMode.ElideRight)
    widget.setSpacing(2)
    return widget


class DownloadPanel(QWidget):
    message = Signal(str, str)  # level, text for the window's banner
    downloaded = Signal(str, str)  # role (target | draft), snapshot folder to load
    offline = Signal(str)  # why the hub cannot be used: show the local cache instead

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.search_job, self.download_job, self.drafts_job = HubJob(self), HubJob(self), HubJob(self)
        self._queue: list[tuple[str, str]] = []  # (role, repo id) still to download
        self._current: tuple[str, str] | None = None

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.status.setObjectName("hint")
        self.curated = _list()
        self.curated.setMaximumHeight(170)
        for pair in CURATED_PAIRS:
            item = QListWidgetItem(pair.label)
            item.setData(MODEL_ROLE, pair)
            self.curated.addItem(item)
        self.pair_button = QPushButton("Download pair")
        self.pair_button.setToolTip("Download the chosen target and draft; both fields are filled when done")
        self.pair_button.clicked.connect(self.download_pair)

        self.query = QLineEdit()
        self.query.setPlaceholderText("Search the hub, e.g. Qwen2.5 Instruct")
        self.query.returnPressed.connect(self.run_search)
        self.search_button = QPushButton("Search")
        self.search_button.clicked.connect(self.run_search)
        self.results = _list()
        self.as_target = QPushButton("Download as target")
        self.as_target.clicked.connect(lambda: self._download_selected("target"))
        self.as_draft = QPushButton("Download as draft")
        self.as_draft.clicked.connect(lambda: self._download_selected("draft"))
        self.drafts_button = QPushButton("Find drafts")
        self.drafts_button.setToolTip("Mark the smaller results whose tokenizer is identical to the selected model's")
        self.drafts_button.clicked.connect(self.find_drafts)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.hide()
        self.progress_text = QLabel("")
        self.progress_text.setObjectName("hint")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)

        layout = QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(QLabel("<b>Known-good pairs</b> (target + draft with the same tokenizer)"))
        layout.addWidget(self.curated)
        row = QHBoxLayout()
        row.addWidget(self.pair_button)
        row.addStretch(1)
        layout.addLayout(row)
        search_row = QHBoxLayout()
        search_row.addWidget(self.query, 1)
        search_row.addWidget(self.search_button)
        layout.addLayout(search_row)
        layout.addWidget(self.results, 1)
        buttons = QHBoxLayout()
        for b in (self.as_target, self.as_draft, self.drafts_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        layout.addLayout(buttons)
        progress_row = QHBoxLayout()
        progress_row.addWidget(self.progress, 1)
        progress_row.addWidget(self.cancel_button)
        layout.addLayout(progress_row)
        layout.addWidget(self.progress_text)

        self._probed = False
        self.probe_job = HubJob(self)
        self.probe_job.done.connect(self._on_probe)
        self.search_job.done.connect(self._on_results)
        self.search_job.failed.connect(self._on_search_failed)
        self.drafts_job.done.connect(self._on_drafts)
        self.drafts_job.failed.connect(lambda text, _c: self.message.emit("error", f"Finding drafts: {text}"))
        self.download_job.progress.connect(self._on_progress)
        self.download_job.done.connect(self._on_downloaded)
        self.download_job.failed.connect(self._on_download_failed)
        self.refresh_mode()

    # ---------------------------------------------------------------- online / offline
    def refresh_mode(self) -> None:
        offline = hub.is_offline()
        for w in (self.search_button, self.query, self.pair_button, self.as_target, self.as_draft, self.drafts_button):
            w.setEnabled(not offline)
        if offline:
            self.status.setText("Offline (HF_HUB_OFFLINE is set): search and downloads are off. The models already "
                                "on this PC are listed under Local cache.")
        else:
            self.status.setText(f"Downloads go to your Hugging Face cache ({hub.cache_dir()}); a cancelled download "
                                "resumes where it stopped.")

    def probe(self) -> None:
        """Check once, in the background, that the hub answers; if not, say so and point at the local cache."""
        if not self._probed and not hub.is_offline():
            self._probed = True
            self.probe_job.start(lambda progress, cancel: hub.unreachable())

    def _on_probe(self, reason) -> None:
        if reason:
            self.status.setText(f"Offline: {reason}. Search and downloads need the internet; the models already on "
                                "this PC are listed under Local cache.")
            self.offline.emit(reason)

    def showEvent(self, event) -> None:  # noqa: N802
        super().showEvent(event)
        self.probe()

    # ---------------------------------------------------------------- search and drafts
    def run_search(self) -> None:
        query = self.query.text().strip()
        if self.search_job.start(lambda progress, cancel: hub.search(query)):
            self.search_button.setEnabled(False)
            self.status.setText(f"Searching for '{query}'…")

    def _on_results(self, models: list) -> None:
        self.search_button.setEnabled(True)
        self.results.clear()
        for m in models:
            item = QListWidgetItem(describe(m))
            item.setData(MODEL_ROLE, m)
            self.results.addItem(item)
        self.status.setText(f"{len(models)} text-generation models found." if models else
                            "No text-generation models match; try a shorter search.")

    def _on_search_failed(self, text: str, _cancelled: bool) -> None:
        self.search_button.setEnabled(True)
        self.status.setText(f"{text}. You may be offline: the models already on this PC are under Local cache.")
        self.message.emit("warning", f"Hub search failed: {text}")

    def selected(self) -> hub.HubModel | None:
        item = self.results.currentItem()
        return item.data(MODEL_ROLE) if item is not None else None

    def find_drafts(self) -> None:
        target = self.selected()
        if target is None:
            self.message.emit("error", "Select the target model in the results first.")
            return
        others = [self.results.item(i).data(MODEL_ROLE) for i in range(self.results.count())]
        candidates = [m for m in others if m.repo_id != target.repo_id
                      and (m.size_bytes or 0) < (target.size_bytes or 1 << 62)][:MAX_DRAFT_CANDIDATES]

        def run(progress, cancel):
            full = hub.details(target.repo_id)
            return full, hub.matching_drafts(full, [hub.details(c.repo_id) for c in candidates])

        if self.drafts_job.start(run):
            self.status.setText(f"Comparing tokenizers with {target.repo_id}…")

    def _on_drafts(self, result) -> None:
        target, drafts = result
        ids = {d.repo_id for d in drafts}
        for i in range(self.results.count()):
            item = self.results.item(i)
            m = item.data(MODEL_ROLE)
            item.setText(describe(m) + (f"  ·  ✔ draft for {target.repo_id}" if m.repo_id in ids else ""))
            item.setForeground(QBrush(QColor("#17803d")) if m.repo_id in ids else QBrush())
        self.status.setText(f"{len(ids)} draft(s) share {target.repo_id}'s tokenizer." if ids else
                            f"No smaller result shares {target.repo_id}'s tokenizer; search for its family.")

    # ---------------------------------------------------------------- downloads
    def _download_selected(self, role: str) -> None:
        model = self.selected()
        if model is None:
            self.message.emit("error", "Select a model in the search results first.")
            return
        self.download([(role, model.repo_id)])

    def download_pair(self) -> None:
        item = self.curated.currentItem()
        if item is None:
            self.message.emit("error", "Select one of the known-good pairs first.")
            return
        pair = item.data(MODEL_ROLE)
        self.download([("target", pair.target), ("draft", pair.draft)])

    def download(self, jobs: list[tuple[str, str]]) -> None:
        """Download (role, repo id) one after the other; each finished one is announced with ``downloaded``."""
        if self.download_job.running or self._current is not None:
            self.message.emit("warning", "A download is running; cancel it or wait for it to finish.")
            return
        self._queue = list(jobs)
        self._next()

    def _next(self) -> None:
        if not self._queue:
            self._current = None
            self.cancel_button.setEnabled(False)
            return
        self._current = role, repo_id = self._queue.pop(0)
        self.progress.show()
        self.progress.setValue(0)
        self.progress_text.setText(f"Preparing {repo_id}…")
        self.cancel_button.setEnabled(True)
        self.download_job.start(lambda progress, cancel: hub.download(hub.details(repo_id), progress, cancel))

    def cancel(self) -> None:
        self._queue.clear()
        self.download_job.cancel()

    def _on_progress(self, done: int, total: int, name: str) -> None:
        self.progress.setValue(int(1000 * done / total) if total else 0)
        repo = self._current[1] if self._current else ""
        self.progress_text.setText(f"{repo}: {format_bytes(done)} of {format_bytes(total)} ({name})")

    def _on_downloaded(self, snapshot) -> None:
        role, repo_id = self._current or ("target", "")
        self.progress.setValue(1000)
        self.progress_text.setText(f"{repo_id} is downloaded.")
        self.downloaded.emit(role, str(snapshot))
        self._next()

    def _on_download_failed(self, text: str, cancelled: bool) -> None:
        self._queue.clear()
        self._current = None
        self.cancel_button.setEnabled(False)
        self.progress_text.setText("Cancelled; download again to resume where it stopped." if cancelled else text)
        if not cancelled:
            self.message.emit("error", f"Download failed: {text}")

    def stop(self) -> None:
        for job in (self.search_job, self.download_job, self.drafts_job, self.probe_job):
            job.stop()
