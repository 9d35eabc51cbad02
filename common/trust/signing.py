"""The operator signs a job: the overrides as `flwr run --run-config` takes them, plus a job id, an
expiry and the federation's roster fingerprint, signed over the run config every party will see
(the installed app's defaults fused with those overrides, as Flower fuses them) and the installed
app's hash. The fused config is checked before signing, as every party will check it (`check`):
a job each of them would refuse is never signed."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping

from fedtune.common.errors import FedtuneError
from fedtune.common.protocol import JobWire
from fedtune.common.trust.app_pin import installed_app
from fedtune.common.trust.job_signature import load_operator_private_key, new_job_keys, sign


def signed_run_config(*, key: Path, run_config: str, valid_days: int, federation: str,
                      check: Callable[[Mapping[str, Any]], None] | None = None) -> tuple[str, str]:
    """(the `--run-config` text of the signed job, its job id). `federation` is the fingerprint of
    the federation's roster; `check` raises FedtuneError for a fused config a party would refuse."""
    from flwr.common.config import get_fused_config_from_dir, parse_config_args

    job_keys = new_job_keys(valid_days=valid_days, federation=federation)
    private = load_operator_private_key(key)
    try:
        overrides = parse_config_args([run_config]) if run_config.strip() else {}
    except Exception as exc:  # click.ClickException: Flower's message says what the format is
        raise FedtuneError(str(getattr(exc, "message", exc))) from None
    present = [name for name in JobWire.KEYS if name in overrides]
    if present:
        raise FedtuneError(f"--run-config already has {present[0]}: sign the plain overrides, sign-job adds the job keys")
    app = installed_app()
    overrides.update(job_keys)
    try:
        fused = get_fused_config_from_dir(app.root, overrides)
    except ValueError as exc:  # an override the app does not have
        raise FedtuneError(f"{exc}: the app's run config keys are in pyproject.toml [tool.flwr.app.config]") from None
    if check is not None:
        check(fused)
    overrides[JobWire.SIGNATURE] = sign(fused, app_sha256=app.sha256, key=private)
    return " ".join(f"{name}={_toml_value(name, value)}" for name, value in overrides.items()), overrides[JobWire.ID]


def _toml_value(name: str, value: Any) -> str:
    """One value as Flower's `--run-config` parser reads it back unchanged."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if "'" not in text:
        return f"'{text}'"
    if '"' not in text and "\\" not in text:
        return f'"{text}"'
    raise FedtuneError(f"the value of {name} has both kinds of quote; `flwr run --run-config` cannot carry it")
