"""``/v1/webhooks``: the caller's signing secret, so their receiver can verify what we send."""
from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field

from service.api.deps import PrincipalDep, SessionDep
from service.api.errors import problem_responses
from service.jobs import webhooks

router = APIRouter(prefix="/webhooks", tags=["webhooks"])


class WebhookSecretRead(BaseModel):
    secret: str = Field(description="'whsec_' + base64 of 32 random bytes; the HMAC key is the "
                                    "base64-decoded part after the prefix",
                        examples=["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"])
    algorithm: str = Field("HMAC-SHA256", description="Standard Webhooks 'v1' signatures")
    headers: list[str] = Field(default_factory=lambda: ["webhook-id", "webhook-timestamp",
                                                        "webhook-signature"])
    how_to_verify: str


@router.get("/secret", response_model=WebhookSecretRead,
            summary="The secret that signs this tenant's webhooks",
            description="Made on first use and the same for every job of the tenant. Put "
                        "`webhook_url` (and optionally `webhook_stage_events: true`) in a job's "
                        "config to receive its events.",
            responses=problem_responses(401))
def get_secret(principal: PrincipalDep, session: SessionDep) -> WebhookSecretRead:
    secret = webhooks.tenant_secret(session, principal.tenant_id)
    session.commit()
    return WebhookSecretRead(secret=secret, how_to_verify=webhooks.HOW_TO_VERIFY)
