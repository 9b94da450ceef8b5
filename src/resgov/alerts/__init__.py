"""Alerts: budget thresholds, denials, expiries, overages, breakers, store outages, forecasts.

Delivered to signed generic JSON webhooks, Slack (Block Kit) and Discord (embeds),
at least once, through a persisted outbox, never on the hot path. See
:mod:`resgov.alerts.service` for the flow and :mod:`resgov.alerts.signing` for how
receivers verify a delivery.
"""

from resgov.alerts.config import (
    RgfDestinations,
    WebhookSection,
    destinations_from_config,
    validate_thresholds,
)
from resgov.alerts.events import (
    DEFAULT_THRESHOLDS,
    EVENT_TYPES,
    AlertEvent,
    Crossing,
    breaker_tripped,
    budget_exceeded,
    budget_threshold,
    event_id,
    forecast_exhaustion,
    highest_per_line,
    reservation_overage,
    reservations_expired,
    store_down,
    threshold_crossings,
)
from resgov.alerts.service import Alerts, DeliveryResult, RetryPolicy, WebhookNotFound, WebhookReadOnly
from resgov.alerts.signing import signature_header, verify_signature
from resgov.alerts.store import AlertStore, Destination, SQLiteAlertStore

__all__ = [
    "DEFAULT_THRESHOLDS",
    "EVENT_TYPES",
    "AlertEvent",
    "AlertStore",
    "Alerts",
    "Crossing",
    "DeliveryResult",
    "Destination",
    "RetryPolicy",
    "RgfDestinations",
    "SQLiteAlertStore",
    "WebhookNotFound",
    "WebhookReadOnly",
    "WebhookSection",
    "breaker_tripped",
    "budget_exceeded",
    "budget_threshold",
    "destinations_from_config",
    "event_id",
    "forecast_exhaustion",
    "highest_per_line",
    "reservation_overage",
    "reservations_expired",
    "signature_header",
    "store_down",
    "threshold_crossings",
    "validate_thresholds",
    "verify_signature",
]
