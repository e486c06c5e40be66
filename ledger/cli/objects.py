"""The objects the ledger's commands print with ``--json`` (docs/cli-json.md): each declared
once, by the fields of the dict that makes it (``ledger.views`` and the service's reads)."""

from __future__ import annotations

from .shapes import OBJECTS, obj

AMOUNT = "GPU-seconds at the reference rate"

TOKEN = obj("token", "A token's ledger state (`ledger.views.TokenView`).", [
    ("id", "string", "token id (`tok_…`), safe to show; the token itself is the secret"),
    ("account", "string", "Slurm account it belongs to"),
    ("kid", "string", "signing key"),
    ("face", "integer", f"face value, {AMOUNT}"),
    ("remaining", "integer", f"what it can still pay, {AMOUNT}"),
    ("held", "integer", f"held for pending jobs, {AMOUNT}"),
    ("face_hours", "number", "face value in GPU-hours"),
    ("remaining_hours", "number", "remaining in GPU-hours"),
    ("held_hours", "number", "held in GPU-hours"),
    ("status", "string", "active, exhausted, revoked or expired"),
    ("status_reason", "string?", "why it was revoked or expired"),
    ("not_before", "timestamp", "start of validity"),
    ("expires", "timestamp", ("end of validity (a date given to `--expires` is 23:59:59 UTC "
                             "of that day)")),
    ("scopes", "map of list of string",
     "restrictions: `users`, `gpu_types`, `partitions`, `clusters` (absent: any)"),
    ("parent", "string?", "the token it was split from"),
    ("created", "timestamp", "when it was minted or split"),
])

ISSUED = obj("issued-token", "A token just minted or split off.", [
    ("token", "string?", ("the token itself (a secret: hand it to its user); null when "
                         "written to `file`")),
    ("file", "string?", "the file it was written to (`--out`, mode 0600)"),
    ("backup", "string?", "with `--force`: where the file's old token was kept"),
    ("view", "token", "its ledger state"),
])

HOLD = obj("hold", "A hold: a job's maximum cost in escrow, then what it was charged "
                   "(`ledger.views.HoldView`).", [
    ("id", "string", "hold id (`hold_…`)"),
    ("token_id", "string", "the token that pays"),
    ("account", "string", "the token's account"),
    ("user", "string?", "the job's user"),
    ("gpu_type", "string?", "GPU type asked for (null: any)"),
    ("gpus", "integer", "GPUs (or shares) per task instance"),
    ("seconds", "integer", "time limit in seconds"),
    ("tasks", "integer", "array tasks"),
    ("rate_ppm", "integer", "rate it was priced at, parts per million"),
    ("partition", "string?", "partition(s) asked for"),
    ("cluster", "string?", "cluster"),
    ("gres", "string", "gpu, shard or mps"),
    ("per_node", "integer?", "shares one node takes (shard/mps)"),
    ("share", "integer", "shares per GPU it was priced at (1: whole GPUs)"),
    ("qos", "string?", "QOS"),
    ("multiplier_ppm", "integer", "tier multiplier it was priced at, parts per million"),
    ("state", "string", "pending, posted or voided"),
    ("job_id", "string?", "Slurm job id once bound"),
    ("amount", "integer", f"held, {AMOUNT}"),
    ("charged", "integer", f"charged, {AMOUNT}"),
    ("refunded", "integer", f"refunded after the charge, {AMOUNT}"),
    ("returned", "integer", f"returned to the token when it closed, {AMOUNT}"),
    ("held_hours", "number", "held in GPU-hours"),
    ("charged_hours", "number", "charged in GPU-hours"),
    ("returned_hours", "number", "returned in GPU-hours"),
    ("refunded_hours", "number", "refunded in GPU-hours"),
    ("created", "timestamp", "when it was reserved"),
    ("resolved", "timestamp?", "when it was posted or voided"),
])

CHARGE = obj("charge", "One settlement of a hold (a node's run).", [
    ("key", "string", "idempotency key of the charge"),
    ("amount", "integer", f"charged, {AMOUNT}"),
    ("job_id", "string?", "Slurm job id"),
    ("node", "string?", "node"),
    ("restart", "integer?", "restart count of the run"),
    ("usage", "object?", "the usage record it was charged from (ledger/charge_record.py)"),
    ("created", "timestamp", "when it was charged"),
])

HOLD_DETAIL = obj("hold-detail", "A hold with its charges: every field of "
                                 "[hold](#hold), and `charges`.", [
    *[(f.name + ("?" if f.optional else ""), f.shape, f.doc) for f in OBJECTS[HOLD].fields],
    ("charges", "list of charge", "its settlements, oldest first"),
])

ACCOUNT = obj("account", "An account (`ledger.views.AccountView`).", [
    ("name", "string", "Slurm account"),
    ("tokens", "integer", "tokens it holds"),
    ("remaining", "integer", f"sum of its tokens' remaining, {AMOUNT}"),
    ("held", "integer", f"sum held for pending jobs, {AMOUNT}"),
    ("pool", "integer", f"revoked remainders waiting for an admin (`account pool`), {AMOUNT}"),
    ("remaining_hours", "number", "remaining in GPU-hours"),
    ("held_hours", "number", "held in GPU-hours"),
    ("pool_hours", "number", "pool in GPU-hours"),
    ("report_to", "list of string", "report recipients"),
    ("created", "timestamp?", "when it was created"),
])

KEY = obj("key", "A signing key known to the ledger.", [
    ("kid", "string", "key id"),
    ("purpose", "string", "token (mints tokens) or attest (signs exported journal heads)"),
    ("public_key", "string", "Ed25519 public key, base64url"),
    ("created", "timestamp", "when it was added"),
    ("retired", "timestamp?", "when it was retired"),
    ("private_key_here", "boolean", "whether its private file is on this host"),
])

RATE = obj("rate", "A GPU type's charge rate (the reference GPU's is 1).", [
    ("gpu_type", "string", "GPU type, or `default` for types without a rate"),
    ("rate", "number", "the rate"),
    ("rate_ppm", "integer", "the rate in parts per million (exact)"),
])

RATE_CHANGE = obj("rate-change", "A rate set or removed.", [
    ("gpu_type", "string", "GPU type"),
    ("rate", "number?", "the rate now (null: removed)"),
    ("rate_ppm", "integer?", "the rate now, parts per million"),
    ("previous", "number?", "the rate before (null: there was none)"),
    ("previous_ppm", "integer?", "the rate before, parts per million"),
])

TIER = obj("tier", "A rate multiplier.", [
    ("kind", "string", "partition, qos or offpeak"),
    ("name", "string", "partition, QOS, or off-peak window HH:MM-HH:MM"),
    ("multiplier", "number", "the multiplier"),
    ("multiplier_ppm", "integer", "the multiplier in parts per million (exact)"),
    ("zone", "string?", "offpeak: the site's time zone"),
])

TIER_CHANGE = obj("tier-change", "A multiplier set or removed.", [
    ("kind", "string", "partition, qos or offpeak"),
    ("name", "string", "its name or window"),
    ("multiplier", "number?", "the multiplier now (null: removed, that tier pays x1)"),
    ("multiplier_ppm", "integer?", "the multiplier now, parts per million"),
    ("previous", "number?", "the multiplier before (null: there was none)"),
    ("previous_ppm", "integer?", "the multiplier before, parts per million"),
    ("zone", "string?", "offpeak: the site's time zone"),
])

JOURNAL_ROW = obj("journal-row", "One journal row: a movement or a state change.", [
    ("seq", "integer", "position in the chain"),
    ("time", "timestamp", "when it was written"),
    ("kind", "string", ("mint, split, transfer, reserve, charge, release, void, refund, "
                       "revoke, expire, burn, rate_set, rate_unset, multiplier_set, …")),
    ("from", "string?", ("debited wallet (`system:issuance`, `token:tok_…`, `account:NAME` "
                        "— an account's pool, …)")),
    ("to", "string?", "credited wallet"),
    ("amount", "integer", f"moved, {AMOUNT} (0 for a state change)"),
    ("account", "string?", "account concerned"),
    ("token_id", "string?", "token concerned"),
    ("hold_id", "string?", "hold concerned"),
    ("reason", "string?", "why (given by the admin)"),
    ("detail", "string?", "a state change in words: `h100: 1 -> 2`"),
    ("data", "object", ("the row's data as recorded and hashed (free-form per kind; its "
                       "times are as they were written)")),
    ("hash", "string?", "the row's chain hash (null while waiting to be chained)"),
])

VERIFY = obj("verify-result", "What `verify` found.", [
    ("ok", "boolean", "everything checks"),
    ("rows", "integer", "journal rows checked"),
    ("head_seq", "integer", "last row of the chain"),
    ("head_hash", "string", "its hash"),
    ("pending", "integer", "rows waiting to be chained (server databases)"),
    ("bad_seq", "integer?", "first bad row"),
    ("problem", "string?", "the first problem"),
    ("problems", "list of string", "every problem"),
    ("head_file?", "string", "with `--export-head`: the signed head written"),
])

EXPIRED = obj("expired-token", "A token `expire` closed.", [
    ("token_id", "string", "token"),
    ("account", "string", "its account"),
    ("amount", "integer", f"its remainder, moved to system:expired, {AMOUNT}"),
    ("hours", "number", "the same in GPU-hours"),
])

TRANSFER = obj("transfer", "A transfer between two tokens.", [
    ("amount", "integer", f"moved, {AMOUNT}"),
    ("hours", "number", "moved, GPU-hours"),
    ("from", "token", "the source after it"),
    ("to", "token", "the destination after it"),
])

BURN = obj("pool-burn", "Pool value returned to the issuer.", [
    ("account", "string", "account"),
    ("amount", "integer", f"burned, {AMOUNT}"),
    ("hours", "number", "burned, GPU-hours"),
    ("pool", "integer", f"left in the pool, {AMOUNT}"),
    ("pool_hours", "number", "left in the pool, GPU-hours"),
])

DONE = obj("done", "What a command that changes settings did.", [
    ("ok", "boolean", "always true (a failure is an `Error:` and exit status 1)"),
    ("message", "string", "what was done, as the text output says it"),
])

SCHEMA = obj("schema-revision", "A database schema revision.", [
    ("component", "string", "ledger, or a component's own migrations (reports)"),
    ("revision", "string?", "the revision the database is at (null: empty)"),
    ("latest", "string", "the newest revision this version knows"),
    ("previous?", "string?", "`db upgrade`: the revision before"),
])

REFUSAL = obj("refusal", "Why a token cannot pay for a request (`quote`, `hold reserve`: "
                         "printed with exit status 1).", [
    ("ok", "boolean", "false"),
    ("reason", "string", ("insufficient, exhausted, revoked, expired, not_yet_valid, "
                         "wrong_partition, wrong_user, … (stable words)")),
    ("message", "string", "the sentence shown to people, with what to do"),
    ("token_id", "string?", "the token"),
    ("needed", "integer?", f"what the request needs, {AMOUNT}"),
    ("available", "integer?", f"what the token has, {AMOUNT}"),
])
