"""The role each operator-facing RPC needs, in one table (tests/orchestrator/test_roles.py checks
that every method of OperatorService and AdminService is listed and enforced)."""

from __future__ import annotations

from protos.wire import Role

VIEWER, OPERATOR, ADMIN = Role.VIEWER, Role.OPERATOR, Role.ADMIN

REQUIRED_ROLE: dict[str, Role] = {
    # OperatorService
    "SubmitJob": OPERATOR,
    "SubmitCampaign": OPERATOR,
    "GetCampaign": VIEWER,
    "ListCampaigns": VIEWER,
    "CancelJob": OPERATOR,
    "GetJob": VIEWER,
    "GetJobHistory": VIEWER,
    "ListJobs": VIEWER,
    "WatchJobs": VIEWER,
    "ListDevices": VIEWER,
    "GetDevice": VIEWER,
    "ListAdapters": VIEWER,
    "GetAdapter": VIEWER,
    "ActivateAdapter": OPERATOR,
    "DeactivateAdapter": OPERATOR,
    "RollbackAdapter": OPERATOR,
    "GetFleetSummary": VIEWER,
    "CreateEnrollmentToken": ADMIN,
    "PauseCampaign": OPERATOR,
    "ResumeCampaign": OPERATOR,
    "CancelCampaign": OPERATOR,
    "StartRollout": OPERATOR,
    "GetRollout": VIEWER,
    "ListRollouts": VIEWER,
    "PauseRollout": OPERATOR,
    "ResumeRollout": OPERATOR,
    "UndoRollout": OPERATOR,
    "SetGatePolicy": OPERATOR,
    "ListGatePolicies": VIEWER,
    "DeleteGatePolicy": OPERATOR,
    # AdminService
    "CreateOperator": ADMIN,
    "ListOperators": ADMIN,
    "CreateOperatorToken": ADMIN,
    "ListOperatorTokens": ADMIN,
    "RevokeOperatorToken": ADMIN,
    "ListEnrollmentTokens": ADMIN,
    "RevokeEnrollmentToken": ADMIN,
    "SetDeviceLabels": ADMIN,
    "ResetDevice": ADMIN,
    "RevokeDevice": ADMIN,
    "DeleteDevice": ADMIN,
    "ListAuditEvents": ADMIN,
}
