--[[
gpuledger job_submit.lua (Slurm 22.05+, Lua 5.1-5.4): every GPU job must carry a token that
pays for its maximum cost, held in escrow by the gpuledger daemon.

A pipe. A job that asks for no GPU (asks_gpu: the one rule decided here) passes untouched
and nothing is contacted. For any other, ONE request over the daemon's Unix socket (kept
open across calls, strict total timeout) forwards Slurm's fields as Slurm has them — the
tres_per_* strings, time limit, node and task counts, array spec, account, QOS, the token
(GPULEDGER_TOKEN in spank_job_env, from the SPANK plugin) and the candidate partitions'
DefaultTime/MaxTime/MaxNodes/TotalNodes — and the daemon's job-request reader
(ledger/jobrequest.py) decides the rest: GPUs or shares, type, nodes, seconds, array tasks,
free accounts, and each refusal's text. On a hold, AdminComment becomes exactly
"gpuledger:hold=<hold_id>;token=<token_id>" (never the token); only root may change ours.
scontrol update of a held job forwards the update and the job record: the daemon re-prices
the hold (or voids it: no GPU any more) and re-checks the token's scopes, or refuses.
Refusals return an ESLURM code (by the daemon's reason) and tell the user why with
slurm.log_user("gpu-token: ..."). The daemon away or slow: a free account's job runs, a job
without a token is refused, the others are refused (on_ledger_unavailable = reject) or
accepted as "gpuledger:deferred" (= accept; PrologSlurmctld reserves). A Lua error anywhere
refuses the job (everything runs under pcall).

Slurm releases (docs/slurm-facts.md; tests/fixtures/slurm/<release>/lua.json): GPU requests
say "gres:gpu" before 23.11, "gres/gpu" from it (both forwarded as they are); log_user() in
slurm_job_modify reaches the user from 23.02 (22.05 drops it: the refusal goes to slurmctld's
log), told apart by slurm.ESLURM_INVALID_JOB_ID (every ESLURM_* from 23.02); --qos is a
comma list from 24.11 (the ledger holds at the largest multiplier; no --qos: held at 1,
PrologSlurmctld re-prices); job_rec.original_sluid (26.05) is named in the modify log line.

Settings: key = value lines in /etc/gpuledger/job_submit.conf (or $GPULEDGER_JOB_SUBMIT_CONF),
rendered from gpuledger.toml [submit] (`gpuledger config render-submit-conf`), read when
this script loads: `touch /etc/slurm/job_submit.lua` after a change. Keys (defaults):
  socket = /run/gpuledger/gpuledger.sock
  timeout = 1.0                      seconds, whole round trip including connect
  on_ledger_unavailable = reject     or accept
  free_accounts =                    Slurm accounts whose jobs need no token (the daemon
                                     decides; this list serves only while it cannot)
  cluster =                          sent with requests (default: the daemon's cluster)
Needs lua-socket (Debian package lua-socket) for socket.unix.
--]]

local NO_VAL = 4294967294
local INFINITE = 4294967295
local NO_VAL16 = 65534
local TOKEN_VAR = "GPULEDGER_TOKEN="
local HOLD_MARK = "gpuledger:"

local conf = {
	socket = "/run/gpuledger/gpuledger.sock",
	timeout = 1.0,
	on_ledger_unavailable = "reject",
	free_accounts = {},
	cluster = nil,
}
local conf_path = os.getenv("GPULEDGER_JOB_SUBMIT_CONF") or "/etc/gpuledger/job_submit.conf"
-- Whether slurm.log_user() in slurm_job_modify reaches the user (23.02+, see above).
local MODIFY_LOG_USER = slurm.ESLURM_INVALID_JOB_ID ~= nil

-- Numbers from slurmctld are floats on Lua 5.3/5.4 (60.0 .. "" is "60.0"): every number
-- that becomes text goes through int() first.
local function int(v)
	v = tonumber(v)
	return v and math.floor(v)
end

local function id_text(v)
	return v and string.format("%d", int(v)) or "?"
end

local function trim(s)
	return (s:gsub("^%s+", ""):gsub("%s+$", ""))
end

local function load_conf(path)
	local f = io.open(path, "r")
	if not f then
		return
	end
	for raw in f:lines() do
		local line = trim(raw:gsub("#.*$", ""))
		local k, v = line:match("^([%w_]+)%s*=%s*(.-)$")
		if k == "socket" and v ~= "" then
			conf.socket = v
		elseif k == "timeout" then
			local t = tonumber(v)
			if t and t > 0 and t <= 30 then
				conf.timeout = t
			else
				slurm.log_error("gpuledger: %s: timeout %s is not in (0, 30]; using %s", path, v, conf.timeout)
			end
		elseif k == "on_ledger_unavailable" then
			if v == "reject" or v == "accept" then
				conf.on_ledger_unavailable = v
			else
				slurm.log_error("gpuledger: %s: on_ledger_unavailable must be reject or accept", path)
			end
		elseif k == "free_accounts" then
			conf.free_accounts = {}
			for a in v:gmatch("[^,%s]+") do
				conf.free_accounts[a] = true
			end
		elseif k == "cluster" then
			conf.cluster = (v ~= "" and v) or nil
		elseif line ~= "" then
			slurm.log_error("gpuledger: %s: ignoring line %q", path, line)
		end
	end
	f:close()
end

load_conf(conf_path)

local have_socket, socket = pcall(require, "socket")
local have_unix, unix = pcall(require, "socket.unix")
if not (have_socket and have_unix) then
	slurm.log_error("gpuledger: lua-socket (socket.unix) is missing: GPU jobs count as ledger unavailable")
end

local now = have_socket and socket.gettime or os.time
do -- a seed no other slurmctld start shares: time, sub-second time, heap address
	local addr = tonumber(tostring({}):match("0x(%x+)") or "0", 16) or 0
	math.randomseed((os.time() + math.floor((now() % 1) * 1e6) + addr) % 2147483647)
end
local key_prefix = string.format("js-%x-%x%x-", os.time(), math.random(0, 0x7fffffff), math.random(0, 0x7fffffff))
local key_counter = 0

-- Refusals travel as error tables through pcall; anything else is a Lua error.
local function refuse(message, code)
	-- Slurm reads a nil return code as 0 (SUCCESS): a refusal always carries an error code.
	error({ refuse = message, code = code or slurm.ERROR }, 0)
end

local function code(name)
	return slurm[name] or slurm.ERROR
end

-- the daemon's reasons -> Slurm's codes (anything else: ESLURM_ACCESS_DENIED)
local REASON_CODES = {
	insufficient = "ESLURM_ACCOUNTING_POLICY",
	exhausted = "ESLURM_ACCOUNTING_POLICY",
	wrong_account = "ESLURM_INVALID_ACCOUNT",
	unknown_account = "ESLURM_INVALID_ACCOUNT",
	request = "ERROR", -- the job-request reader: unreadable or contradictory GRES, array
	time_limit = "ESLURM_INVALID_TIME_LIMIT",
}
local UNAVAILABLE = { unavailable = true, internal = true, busy = true }

-- wire format: key=value, percent-encoded values -------------------------------------

local function esc(v)
	local s = tostring(v)
	if s:find("[^A-Za-z0-9%-%._~:/@,+]") then
		s = s:gsub("[^A-Za-z0-9%-%._~:/@,+]", function(c)
			return string.format("%%%02X", c:byte())
		end)
	end
	return s
end

-- A reply line -> its fields as sent: what the script reads of a reply is plain (ids,
-- numbers, words) but a message, which unesc() decodes where one is shown.
local function parse(line)
	local t = {}
	for k, v in line:gmatch("([%w_]+)=(%S*)") do
		t[k] = v
	end
	return t
end

local function unesc(v)
	return v and (v:gsub("%%(%x%x)", function(h)
		return string.char(tonumber(h, 16))
	end))
end

-- the connection, kept open across calls (the Lua state persists between jobs) --------

local conn = nil

local function close_conn()
	if conn then
		conn:close()
		conn = nil
	end
end

local function open(deadline)
	local c = (unix.stream or unix)()
	if not c then
		return nil, "cannot create socket"
	end
	c:settimeout(math.max(deadline - now(), 0.001), "t")
	local ok, err = c:connect(conf.socket)
	if not ok then
		c:close()
		return nil, err
	end
	return c
end

-- One request line -> one response line within conf.timeout, or nil and why. A reused
-- connection the daemon closed (restart) is retried once on a fresh one: requests are
-- idempotent (reserve carries a key; resize is absolute).
local function call(line)
	if not (have_socket and have_unix) then
		return nil, "lua-socket missing"
	end
	local deadline = now() + conf.timeout
	for _ = 1, 2 do
		local fresh = false
		if not conn then
			local c, err = open(deadline)
			if not c then
				return nil, tostring(err)
			end
			conn, fresh = c, true
		end
		local left = deadline - now()
		if left <= 0 then
			close_conn()
			return nil, "timeout"
		end
		conn:settimeout(left, "t")
		local ok, err = conn:send(line)
		if ok then
			local resp
			resp, err = conn:receive("*l")
			if resp then
				return resp
			end
		end
		close_conn()
		if fresh or err == "timeout" then
			return nil, tostring(err)
		end
	end
	return nil, "closed"
end

-- what the job asks: one rule here, the rest is the daemon's ---------------------------------

-- The CPU-job shortcut. A job asks for a GPU when an item of tres_per_node/job/task/socket
-- names gpu, shard or mps (the whole name after an optional "gres:" or "gres/": "gpunic"
-- is not a GPU, "gres/shard:2" is one) and does not end in a count of zero ("gres:gpu:0").
-- Any other job passes here without contacting anyone. ledger/jobrequest.py asks_gpu is
-- this rule in Python, applied first by the reader; tests/test_one_rule.py runs both.
local GPU_BACKED = { gpu = true, shard = true, mps = true }
local TRES_FIELDS = { "tres_per_node", "tres_per_job", "tres_per_task", "tres_per_socket" }

local function asks_gpu(d)
	for _, f in ipairs(TRES_FIELDS) do
		local v = d[f]
		if v then
			for item in v:gmatch("[^,]+") do
				if GPU_BACKED[item:gsub("^gres[:/]", ""):match("^[%w_.+-]+") or ""]
					and not item:find("[:=]0+$") then
					return true
				end
			end
		end
	end
	return false
end

-- Slurm's request fields, forwarded as Slurm has them for the daemon's job-request reader
-- (ledger/jobrequest.py), which decides GPUs, shares, nodes, seconds, array tasks, free
-- accounts and every refusal: the GRES strings, and the numbers Slurm set (one left unset —
-- nil, or the field's NO_VAL marker — is not sent).
local FORWARDED = { { "tres_per_node" }, { "tres_per_job" }, { "tres_per_task" },
	{ "tres_per_socket" }, { "time_limit", NO_VAL }, { "min_nodes", NO_VAL },
	{ "max_nodes", NO_VAL }, { "num_tasks", NO_VAL }, { "ntasks_per_node", NO_VAL16 },
	{ "sockets_per_node", NO_VAL16 } }

local function forward(d, prefix)
	local out = ""
	for _, f in ipairs(FORWARDED) do
		local v = d[f[1]]
		if v ~= nil and v ~= f[2] then
			out = out .. " " .. prefix .. f[1] .. "=" .. (f[2] and id_text(v) or esc(v))
		end
	end
	return out
end

-- A partition limit for the wire: empty when unset or unlimited.
local function limit(v)
	v = int(v)
	if v == nil or v == NO_VAL or v == INFINITE then
		return ""
	end
	return string.format("%d", v)
end

-- " candidates=name:default_time:max_time:max_nodes:total_nodes,..." for the partitions a
-- job may run in: those it names ("a,b"), else the default one.
local function candidates(names, part_list)
	if not names then
		for name, p in pairs(part_list or {}) do
			if p.flag_default and p.flag_default ~= 0 then
				names = p.name or name
				break
			end
		end
	end
	local out = nil
	for name in (names or ""):gmatch("[^,]+") do
		local p = part_list and part_list[name]
		local item = p and (name .. ":" .. limit(p.default_time) .. ":" .. limit(p.max_time) .. ":"
			.. limit(p.max_nodes) .. ":" .. limit(p.total_nodes)) or (name .. "::::")
		out = out and (out .. "," .. item) or item
	end
	return out and (" candidates=" .. esc(out)) or ""
end

local function token_of(d)
	local env = d.spank_job_env
	if not env then
		return nil
	end
	local n = tonumber(d.spank_job_env_size) or 0
	for i = 0, n - 1 do -- indexed from 0
		local e = env[i]
		if e and e:sub(1, #TOKEN_VAR) == TOKEN_VAR then
			-- blank is no token (the hooks strip it the same way): never deferred, never free
			local t = trim(e:sub(#TOKEN_VAR + 1))
			return t ~= "" and t or nil
		end
	end
	return nil
end

-- the hooks --------------------------------------------------------------------------------

-- The daemon cannot answer. Then, and only then, this script decides alone: a free
-- account's job runs (the reader would have said so: it reads the same [submit]
-- free_accounts this file is rendered from); a job without a token is refused (deferred,
-- it would only be cancelled when it starts); any other is deferred or refused, as
-- on_ledger_unavailable says.
local function unavailable(d, what, why, logged, token, account)
	if account and conf.free_accounts[account] then
		slurm.log_info("gpuledger: result=free op=%s why=%s %s", what, esc(why), logged)
		return slurm.SUCCESS
	end
	if what == "submit" and not token then
		slurm.log_info("gpuledger: result=refused reason=no_token why=%s %s", esc(why), logged)
		refuse("gpu-token: this job asks for GPUs but carries no GPU token (and the GPU ledger "
			.. "is unavailable: " .. why .. "); submit it with --gpu-token=@FILE",
			code("ESLURM_ACCESS_DENIED"))
	end
	if conf.on_ledger_unavailable == "accept" and what == "submit" then
		d.admin_comment = HOLD_MARK .. "deferred"
		slurm.log_info("gpuledger: result=deferred why=%s %s", esc(why), logged)
		return slurm.SUCCESS
	end
	slurm.log_info("gpuledger: result=unavailable op=%s why=%s %s", what, esc(why), logged)
	refuse("gpu-token: the GPU ledger is unavailable (" .. why .. "); "
		.. (what == "submit" and "job refused, try again shortly" or "change refused"), code("ERROR"))
end

local function refused(r)
	refuse("gpu-token: " .. (unesc(r.message) or r.reason or "refused"),
		code(REASON_CODES[r.reason] or "ESLURM_ACCESS_DENIED"))
end

local function submit(d, part_list)
	if not asks_gpu(d) then
		return slurm.SUCCESS
	end
	-- gpuledger:test-hook (tests replace this line to force a Lua error)
	local t0 = now()
	local account = d.account or d.default_account
	local token = token_of(d)
	local logged = "user=" .. esc(d.user_name or id_text(d.user_id)) .. " account=" .. esc(account or "")
	key_counter = key_counter + 1
	local line = "op=reserve" .. (d.user_name and (" user=" .. esc(d.user_name)) or "")
		.. " uid=" .. id_text(d.user_id) .. (account and (" account=" .. esc(account)) or "")
		.. forward(d, "") .. (d.array_inx and (" array_inx=" .. esc(d.array_inx)) or "")
		.. candidates(d.partition, part_list)
		.. ((d.qos and d.qos ~= "") and (" qos=" .. esc(d.qos)) or "")
		.. (token and (" token=" .. esc(token)) or "") .. " key=" .. key_prefix .. key_counter
		.. (conf.cluster and (" cluster=" .. esc(conf.cluster)) or "") .. "\n"
	local resp, err = call(line)
	if not resp then
		return unavailable(d, "submit", err, logged, token, account)
	end
	local r = parse(resp)
	local us = math.floor((now() - t0) * 1e6)
	if r.ok == "1" and r.hold and r.token_id then
		d.admin_comment = HOLD_MARK .. "hold=" .. r.hold .. ";token=" .. r.token_id
		slurm.log_info("gpuledger: result=held hold=%s token=%s amount=%s hours=%s desc=%s %s us=%d",
			r.hold, r.token_id, r.amount or "", r.hours or "", r.desc or "", logged, us)
		return slurm.SUCCESS
	end
	if r.ok == "1" and (r.result == "free" or r.result == "none") then
		slurm.log_info("gpuledger: result=%s %s us=%d", r.result, logged, us)
		return slurm.SUCCESS
	end
	if UNAVAILABLE[r.reason or ""] or r.ok ~= "0" then
		return unavailable(d, "submit", unesc(r.message) or "bad reply", logged, token, account)
	end
	slurm.log_info("gpuledger: result=refused reason=%s token=%s %s us=%d", esc(r.reason or ""),
		esc(r.token_id or ""), logged, us)
	refused(r)
end

-- " sluid=s…" for a job record that has one (26.05: job_rec.original_sluid), else ""
local function sluid_text(rec)
	local ok, v = pcall(function()
		return rec.original_sluid
	end)
	if ok and type(v) == "string" and v:match("^[sS]%w+$") then
		return " sluid=" .. v
	end
	return ""
end

local function ours(s)
	return s ~= nil and s:sub(1, #HOLD_MARK) == HOLD_MARK
end

local function modify(d, rec, part_list, uid)
	local old = rec.admin_comment
	local new = d.admin_comment
	if new ~= nil and new ~= old and uid ~= 0 and (ours(old) or ours(new)) then
		refuse("gpu-token: AdminComment holds the job's GPU-token hold and cannot be changed",
			code("ESLURM_ACCESS_DENIED"))
	end
	local hold = old and old:match("^gpuledger:hold=(hold_%x+);")
	-- what the update changes that a price depends on; an update that changes none of it
	-- (a name, a QOS) is not the ledger's business
	local changes = forward(d, "")
		.. ((d.partition and d.partition ~= "") and (" partition=" .. esc(d.partition)) or "")
		.. ((d.account and d.account ~= "") and (" account=" .. esc(d.account)) or "")
	if changes == "" then
		return slurm.SUCCESS
	end
	-- a job without a hold only asks the reader when it starts asking for GPUs (a deferred
	-- job is priced by PrologSlurmctld with its final limits)
	if not hold and (ours(old) or not asks_gpu(d)) then
		return slurm.SUCCESS
	end
	local line = "op=resize" .. (hold and (" hold=" .. hold) or "") .. changes .. forward(rec, "rec_")
		.. (rec.account and (" rec_account=" .. esc(rec.account)) or "")
		.. candidates((d.partition ~= "" and d.partition) or rec.partition, part_list) .. "\n"
	local resp, err = call(line)
	local r = resp and parse(resp) or { reason = "unavailable", message = tostring(err) }
	if r.ok == "1" then
		if r.state == "voided" then
			d.admin_comment = ""
		end
		if hold then
			slurm.log_info("gpuledger: result=%s job=%s%s hold=%s amount=%s delta=%s uid=%d",
				r.state == "voided" and "void" or "resize", id_text(rec.job_id), sluid_text(rec), hold,
				r.amount or "", r.delta or "", int(uid) or -1)
		end
		return slurm.SUCCESS
	end
	slurm.log_info("gpuledger: result=refused op=modify job=%s%s hold=%s reason=%s", id_text(rec.job_id),
		sluid_text(rec), hold or "", esc(r.reason or ""))
	if UNAVAILABLE[r.reason or ""] then
		return unavailable(d, "modify", unesc(r.message) or "bad reply", "job=" .. id_text(rec.job_id), true,
			not hold and (d.account or rec.account) or nil)
	end
	refused(r)
end

-- The user's copy of a refusal: slurm.log_user, except in a modify where the release
-- drops it (22.05): the text then goes to slurmctld's log.
local function tell(text, in_modify)
	if in_modify and not MODIFY_LOG_USER then
		slurm.log_info("gpuledger: change refused (not shown to the user by this Slurm): %s", text)
	else
		slurm.log_user("%s", text)
	end
end

local function outcome(in_modify, ok, rc)
	if ok then
		return rc
	end
	if type(rc) == "table" and rc.refuse then
		tell(rc.refuse, in_modify)
		return rc.code
	end
	slurm.log_error("gpuledger: lua error, job refused: %s", tostring(rc))
	tell("gpu-token: internal error in the GPU token check; job refused (tell your admins)", in_modify)
	return slurm.ERROR
end

function slurm_job_submit(job_desc, part_list, submit_uid)
	return outcome(false, pcall(submit, job_desc, part_list, submit_uid))
end

function slurm_job_modify(job_desc, job_rec, part_list, modify_uid)
	return outcome(true, pcall(modify, job_desc, job_rec, part_list, modify_uid))
end

slurm.log_info("gpuledger: job_submit.lua loaded (socket=%s timeout=%s on_ledger_unavailable=%s)",
	conf.socket, conf.timeout, conf.on_ledger_unavailable)
