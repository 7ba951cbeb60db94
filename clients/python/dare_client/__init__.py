"""Client for the DARE service: :class:`DareClient` and the API's wire schemas."""
from dare_client.client import (
                                ApiError,
                                ClientError,
                                DareClient,
                                DownloadError,
                                ServerUnreachable,
                                wait_ready,
)
from dare_client.schemas import JobStatus

__all__ = ["ApiError", "ClientError", "DareClient", "DownloadError", "JobStatus", "ServerUnreachable",
           "wait_ready"]
