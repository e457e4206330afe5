"""Early-warning alerts (method S741–S742).

When any finding of an image reaches the alert grade, ``AlertNotifier.notify`` writes one
``alert_raised`` log event (study and instance UIDs, finding types and grades — never patient
identifiers) and, when ``[alerts] webhook_url`` is set, POSTs the same facts as JSON to it from
a background thread, retrying with exponential backoff (1 s, 2 s, 4 s, ... capped at 60 s) up
to ``webhook_retries`` times, so a slow or absent receiver never holds up a worker. The SR
carries the flag for the PACS (``node.encode.sr``).
"""

from __future__ import annotations

import json
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass

from node import PRODUCT_NAME, __version__, metrics
from node.config import AlertsConfig
from node.logs import get_logger
from pipeline.result import AnalysisResult

_STOP = object()


@dataclass(frozen=True, slots=True, kw_only=True)
class AlertFinding:
    finding_type: str
    grade: int
    probability: float
    side: str | None
    zone: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Alert:
    """What an alert says: where (UIDs) and what (finding types and grades)."""

    study_instance_uid: str
    sop_instance_uid: str
    sr_sop_instance_uid: str | None
    highest_grade: int
    findings: tuple[AlertFinding, ...]

    @classmethod
    def from_result(
        cls,
        result: AnalysisResult,
        *,
        study_instance_uid: str,
        sop_instance_uid: str,
        sr_sop_instance_uid: str | None = None,
    ) -> Alert | None:
        """The alert for ``result``, or None when no finding reached the alert grade."""
        alerted = [f for f in result.findings if f.alert]
        if not alerted:
            return None
        return cls(
            study_instance_uid=study_instance_uid,
            sop_instance_uid=sop_instance_uid,
            sr_sop_instance_uid=sr_sop_instance_uid,
            highest_grade=max(f.grade for f in alerted),
            findings=tuple(
                AlertFinding(
                    finding_type=f.finding_type.value,
                    grade=f.grade,
                    probability=round(f.probability, 4),
                    side=None if f.side is None else f.side.value,
                    zone=None if f.zone is None else f.zone.value,
                )
                for f in alerted
            ),
        )

    def payload(self) -> dict[str, object]:
        return {"event": "alert", "product": PRODUCT_NAME, "version": __version__, **asdict(self)}


class AlertNotifier:
    """Logs alerts and delivers them to the webhook (if configured) from its own thread."""

    def __init__(self, config: AlertsConfig, *, first_backoff_seconds: float = 1.0) -> None:
        self.config = config
        self.first_backoff_seconds = first_backoff_seconds
        self._log = get_logger("node.alerts")
        self._queue: queue.Queue[object] = queue.Queue()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        if config.webhook_url is not None:
            self._thread = threading.Thread(target=self._run, name="alert-webhook", daemon=True)
            self._thread.start()

    def notify(self, alert: Alert) -> None:
        """S742: log the alert now; queue the webhook POST."""
        metrics.ALERTS_RAISED.inc()
        self._log.warning(
            "alert_raised",
            study_instance_uid=alert.study_instance_uid,
            sop_instance_uid=alert.sop_instance_uid,
            sr_sop_instance_uid=alert.sr_sop_instance_uid,
            highest_grade=alert.highest_grade,
            finding_types=[f.finding_type for f in alert.findings],
            grades=[f.grade for f in alert.findings],
        )
        if self._thread is not None:
            self._queue.put(alert)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the webhook thread (pending retries are abandoned and logged)."""
        self._stopped.set()
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or not isinstance(item, Alert):
                return
            self._deliver(item)

    def _deliver(self, alert: Alert) -> None:
        log = self._log.bind(study_instance_uid=alert.study_instance_uid)
        wait = self.first_backoff_seconds
        for attempt in range(1, self.config.webhook_retries + 2):
            error = self._post(alert)
            if error is None:
                log.info("alert_webhook_delivered", attempts=attempt)
                return
            log.warning("alert_webhook_failed", attempt=attempt, error=error)
            if self._stopped.wait(wait):
                break
            wait = min(wait * 2, 60.0)
        log.error("alert_webhook_given_up", attempts=attempt)

    def _post(self, alert: Alert) -> str | None:
        """One POST; None on a 2xx answer, else the reason."""
        assert self.config.webhook_url is not None
        request = urllib.request.Request(
            self.config.webhook_url,
            data=json.dumps(alert.payload()).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(
                request, timeout=self.config.webhook_timeout_seconds
            ) as response:
                status = int(response.status)
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            return str(exc)
        return None if 200 <= status < 300 else f"HTTP {status}"
