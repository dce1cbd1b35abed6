"""What every doctor check looks at (`Context`) and what it returns (`Check`).

Why a module of its own: the check groups and the runner in `__init__` all need these two types; kept
apart, no group imports the package's `__init__` (which imports every group) and there is no cycle.
The Context builds the expensive facts once (the detected hardware) or on demand (the precision plan,
the local model folder) so that each check stays a few lines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
DEBUGPY_PORT = 5678


@dataclass
class Check:
    name: str
    status: str
    finding: str
    fix: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Context:
    """What every check may look at; built once per `sd35 doctor` run."""

    settings: object | None  # sd35.settings.Settings, None when the settings themselves are invalid
    settings_error: str | None = None
    root: Path = field(default_factory=Path.cwd)  # the workspace (for constraints.txt, .env.example)
    env_file: Path = field(default_factory=lambda: Path(_env_file()))
    api_port: int | None = None  # None: the configured SD35_PORT
    debugpy_port: int = DEBUGPY_PORT
    _hw: object | None = None
    _hw_error: str | None = None

    def hardware(self):
        """The detected hardware, or None (with `hw_error` set) when the device setting cannot be met."""
        if self._hw is None and self._hw_error is None:
            from sd35.errors import Sd35Error
            from sd35.hardware import detect

            try:
                self._hw = detect(self.settings.device if self.settings else "auto")
            except Sd35Error as exc:
                self._hw_error = str(exc)
        return self._hw

    @property
    def model(self) -> str:
        from sd35.models import expand_alias

        return expand_alias(self.settings.model) if self.settings else "tiny"

    @property
    def known(self):
        from sd35.models import lookup

        return lookup(self.model)

    @property
    def kind(self) -> str:
        from sd35.weights.hub import classify

        return classify(self.model)

    def plan(self):
        """The precision plan for the settings on this hardware, or None when it cannot be resolved."""
        from sd35.errors import Sd35Error
        from sd35.precision import resolve

        hw = self.hardware()
        if hw is None or self.settings is None:
            return None
        try:
            return resolve(self.settings.precision, self.settings.t5, hw, emulate=self.settings.fp8_emulate)
        except Sd35Error:
            return None

    def model_folder(self) -> Path | None:
        """A local folder holding the configured model's configs, when there is one (no download)."""
        from sd35.weights.hub import find_local

        return find_local(self.settings) if self.settings else None


def _env_file() -> str:
    from sd35.settings import find_env_file

    return find_env_file()
