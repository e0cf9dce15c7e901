"""Event forwarding (pattern 1): when a delivery is acknowledged, so that no event is lost.

`at_least_once` (the default) acknowledges only after the handler returned and everything it emitted
was confirmed by the broker; a crash before that redelivers the event. `at_most_once` acknowledges on
receipt: faster, and an event in flight is lost if the process dies.
"""

from __future__ import annotations

from typing import Literal

from ..types import CallNext, Envelope, Layer

Delivery = Literal["at_least_once", "at_most_once"]


def forwarding(delivery: Delivery) -> Layer:
    if delivery == "at_most_once":

        async def ack_on_receipt(envelope: Envelope, call_next: CallNext) -> None:
            await envelope.ack()
            await call_next(envelope)

        return ack_on_receipt

    async def ack_after_work(envelope: Envelope, call_next: CallNext) -> None:
        await call_next(envelope)
        # A layer below may have settled it already (a retry scheduled, an event parked).
        await envelope.ack()

    return ack_after_work
