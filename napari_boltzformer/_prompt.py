"""The prompt field: completes the prompts the model knows and the ones typed in this session."""

from __future__ import annotations

from pathlib import Path

from qtpy.QtCore import QStringListModel, Qt
from qtpy.QtWidgets import QCompleter, QLineEdit

from ._layers import GROUND_TRUTH_PREFIX, ROLE_KEY

MAX_RECENT_PROMPTS = 12


class PromptEdit(QLineEdit):
    """A line edit whose completer offers recent prompts (newest first, shared by every panel of
    the session) before the known ones; matches anywhere in a prompt, in any case."""

    recent: list[str] = []  # shared by the panels of this session, newest first

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setPlaceholderText("e.g. lung nodule")
        self.setClearButtonEnabled(True)
        self._known: list[str] = []
        self._suggested = ""  # the last prompt taken from a sample; the reader's own text is kept
        self._model = QStringListModel(self)
        completer = QCompleter(self._model, self)
        completer.setCaseSensitivity(Qt.CaseSensitivity.CaseInsensitive)
        completer.setFilterMode(Qt.MatchFlag.MatchContains)
        self.setCompleter(completer)

    def keyPressEvent(self, event):
        """Enter while the completion list is open picks an entry (the highlighted one, else the
        first) and does not run: "lung nod" + Enter ran "lung nod", which reads as the lung.
        A text that already is one of the entries runs at once."""
        popup = self.completer().popup()
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and popup.isVisible():
            typed = self.text().strip().lower()
            entries = [self.completer().completionModel().index(i, 0).data()
                       for i in range(self.completer().completionCount())]
            if entries and typed not in (e.lower() for e in entries):
                index = popup.currentIndex()
                self.setText(index.data() if index.isValid() else entries[0])
                popup.hide()
                event.accept()
                return
            popup.hide()
        super().keyPressEvent(event)

    def completions(self) -> list[str]:
        return self._model.stringList()

    def set_known(self, prompts: list[str]):
        self._known = list(prompts)
        self._update()

    def remember(self, prompt: str):
        """A prompt that ran goes first (normalised as the model reads it)."""
        from boltzformer.network.text import normalise_prompt

        text = normalise_prompt(prompt)
        recent = [p for p in PromptEdit.recent if p != text]
        PromptEdit.recent[:] = [text, *recent][:MAX_RECENT_PROMPTS]
        self._update()

    def suggest_from(self, viewer) -> None:
        """The field takes the prompt of the newest ground-truth layer ("ground truth: lung
        nodule", as the bundled samples open), so Run works on a sample as it opens: when it is
        empty, or still holds an earlier sample's prompt (the brain sample opened after the
        chest one asks for MS lesions, not nodules). A prompt the reader typed stays."""
        text = self.text().strip()
        if text and text != self._suggested:
            return
        for layer in reversed(viewer.layers):
            if (layer.metadata or {}).get(ROLE_KEY) == "ground truth" and layer.name.startswith(GROUND_TRUTH_PREFIX):
                self._suggested = layer.name[len(GROUND_TRUTH_PREFIX):]
                if self._suggested != text:
                    self.setText(self._suggested)
                return

    def _update(self):
        self._model.setStringList(list(dict.fromkeys([*PromptEdit.recent, *self._known])))


def known_prompts(segmenter, weights) -> tuple[list[str], str, str]:
    """(the prompts a model knows, the panel's model line, its tooltip) for a ready Segmenter, else
    for the weights source (read from its config: no torch); the training vocabulary when neither
    can say."""
    known: list[str] = []
    label = tip = ""
    if segmenter is not None:
        known = list(segmenter.known_prompts)
        source = segmenter.info.get("weights_path")
        label, tip = f"model: {Path(source).stem if source else 'injected'} on {segmenter.device}", str(source or "")
    else:
        from boltzformer import weights as weights_mod
        from boltzformer.errors import BoltzformerError

        try:
            source = weights_mod.resolve(weights)
            known = list(weights_mod.read_config(source.config_path).get("prompts", []))
            where = "bundled" if source.description == "bundled" else str(Path(source.weights_path).parent)
            label = f"model: {Path(source.weights_path).stem} ({where}); loads on first run"
            tip = str(source.weights_path)
        except BoltzformerError as exc:
            label = f"model: {exc}"
    if not known:  # no weights to ask: offer the training vocabulary
        try:
            from boltzformer.synth.prompts import all_prompts

            known = list(all_prompts())
        except ImportError:
            pass
    return known, label, tip
