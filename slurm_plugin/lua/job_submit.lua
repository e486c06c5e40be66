--[[
gpuledger job_submit.lua (Slurm 22.05+, Lua 5.1): every GPU job must carry a token
that pays for its maximum cost; the cost is held in escrow by the gpuledger daemon.

* Jobs asking for no GPU-backed GRES (gpu, shard, mps) pass untouched; nothing is contacted.
* Shares of a GPU (--gres=shard:N / mps:N, per node) are priced by the ledger as shares:
  the request says gres=shard|mps, per_node=N and gpus=N x nodes. Only --gres (per node)
  may ask for shares, and a job asks for whole GPUs or for shares, not both.
* GPU jobs: count GPUs (--gres, --gpus, --gpus-per-node/-task/-socket; "gres:gpu" and
  "gres/gpu"), x nodes/tasks/sockets, x array tasks, x time limit (unset: the
  partitions' DefaultTime, else MaxTime, the longest over -p a,b, else refuse and ask for
  -t), and send ONE request naming every candidate partition over the daemon's Unix
  socket (connection kept open across calls) with a strict total timeout.
* scontrol update of a held job (time, GRES incl. the GPU type, partition, account) asks
  the daemon to re-price the hold and re-check the token's scopes; refused if it cannot. On success AdminComment becomes exactly
  "gpuledger:hold=<hold_id>;token=<token_id>" (never the token itself).
* Refusals return an ESLURM code and tell the user why with slurm.log_user("gpu-token: ...").
* Daemon unreachable/slow: on_ledger_unavailable=reject refuses; =accept accepts the job
  with AdminComment "gpuledger:deferred" (the prolog reserves it later).
* A Lua error anywhere refuses the job (everything runs under pcall).

Slurm releases (22.05 to 26.05; tests/fixtures/slurm/<release>/lua.json, each naming the tag
and source file it was read from):
* GPU requests in tres_per_* say "gres:gpu" before 23.11 and "gres/gpu" from 23.11
  (src/common/slurm_opt.c); both are read, in submit and in scontrol update.
* slurm.log_user() in slurm_job_modify reaches the user from 23.02 (job_submit_lua.c
  job_modify(..., err_msg)); 22.05 drops the text and logs an error for each call, so
  there a refused change is explained in slurmctld's log only. 23.02 is also the release
  that puts every ESLURM_* of slurm_errtab in the slurm table (src/lua/slurm_lua.c), which
  is how the script tells the two apart (slurm.ESLURM_INVALID_JOB_ID).
* job_desc.qos (--qos) is sent as it is (a comma list of QOS from 24.11): the ledger
  prices the hold at the largest QOS multiplier among them. A job without --qos runs in
  its association's default QOS, which this script cannot see: it is held at 1, and
  PrologSlurmctld re-prices the hold to the QOS the job starts in.
* job_rec.original_sluid (26.05) is the job's SLUID: named in the modify log line.

Settings: key = value lines in /etc/gpuledger/job_submit.conf (or the file named by
$GPULEDGER_JOB_SUBMIT_CONF in slurmctld's environment), read when this script loads.
slurmctld reloads the script when its mtime changes: after editing the conf file,
`touch /etc/slurm/job_submit.lua`. Keys (defaults):
  socket = /run/gpuledger/gpuledger.sock
  timeout = 1.0                      seconds, whole round trip including connect
  on_ledger_unavailable = reject     or accept
  free_accounts =                    comma list of Slurm accounts whose jobs need no token
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

local REASON_CODES = {
	insufficient = "ESLURM_ACCOUNTING_POLICY",
	exhausted = "ESLURM_ACCOUNTING_POLICY",
	wrong_account = "ESLURM_INVALID_ACCOUNT",
	unknown_account = "ESLURM_INVALID_ACCOUNT",
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

local function parse(line)
	local t = {}
	for k, v in line:gmatch("([%w_]+)=(%S*)") do
		if v:find("%", 1, true) then
			v = v:gsub("%%(%x%x)", function(h)
				return string.char(tonumber(h, 16))
			end)
		end
		t[k] = v
	end
	return t
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

-- what the job asks for ------------------------------------------------------------------

local function num(v, none)
	v = tonumber(v)
	if v == nil or v == NO_VAL or v == INFINITE or v == (none or NO_VAL) or v <= 0 then
		return nil
	end
	return v
end

-- GRES that hand out a GPU or a share of one. Every one of them is a GPU request: shard
-- and mps (shares of a GPU) are priced as shares, never let through unpaid.
local GPU_BACKED = { gpu = true, shard = true, mps = true }
local SHARED = { shard = true, mps = true }

-- "gres:gpu:h100:2" / "gres/gpu:2" / "gpu" / "shard:4" -> "gpu"/"shard"/..., rest after the name
local function gres_name(item)
	local body = item:gsub("^gres[:/]", "")
	local name = body:match("^([%w_.+-]+)")
	return name, body:sub(#(name or "") + 1)
end

-- "gres:gpu:h100:2,gres:nic:1" -> 2, "h100", nil; "gres:shard:h100:3" -> 3, "h100", "shard"
-- (a count of shares, the shared GRES as third value). Whole GPUs and shares do not mix.
local function gpus_in(spec)
	if not spec or spec == "" then
		return 0, nil, nil
	end
	local count, gtype, shared, whole = 0, nil, nil, false
	for item in spec:gmatch("[^,]+") do
		local name, rest = gres_name(item)
		if name and (SHARED[name] or name == "gpu") then
			if (SHARED[name] and whole) or (name == "gpu" and shared)
				or (SHARED[name] and shared and shared ~= name) then
				refuse("gpu-token: a job asks for whole GPUs or for shares of one (shard, mps), not both",
					code("ERROR"))
			end
			if SHARED[name] then
				shared = name
			else
				whole = true
			end
			-- a type is any name but a bare number (MIG profiles start with one: 3g.40gb)
			local t, n = rest:match("^[:=]([%w][%w_.+-]*)[:=](%d+)$")
			if t and t:match("^%d+$") then
				t, n = nil, nil
			end
			-- Slurm matches GPU types without case (gpu:H100 runs on an h100): so does the hold
			t = t and t:lower()
			if not t then
				n = rest:match("^[:=](%d+)$")
				t = (not n) and rest:match("^:([%w][%w_.+-]*)$") or nil
				t = t and t:lower()
			end
			if rest ~= "" and not t and not n then
				refuse("gpu-token: cannot read the GPU request " .. item, code("ERROR"))
			end
			if t and gtype and t ~= gtype then
				refuse("gpu-token: one GPU type per job, not " .. gtype .. " and " .. t, code("ERROR"))
			end
			gtype = t or gtype
			count = count + (tonumber(n) or 1)
		end
	end
	return count, gtype, shared
end

local TRES_FIELDS = { "tres_per_node", "tres_per_job", "tres_per_task", "tres_per_socket" }

-- Whether any GRES request names a GPU-backed GRES (not a substring test: "gres:gpunic"
-- is not a GPU, "gres/shard:2" is).
local function asks_gpu(d)
	for _, f in ipairs(TRES_FIELDS) do
		local v = d[f]
		if v then
			for item in v:gmatch("[^,]+") do
				if GPU_BACKED[gres_name(item) or ""] then
					return true
				end
			end
		end
	end
	return false
end

-- The partitions a job may run in: those it names ("a,b"), else the default one.
local function candidates(d, part_list)
	local names = d.partition
	if not names then
		for name, p in pairs(part_list or {}) do
			if p.flag_default and p.flag_default ~= 0 then
				names = p.name or name
				break
			end
		end
	end
	return names
end

-- The most nodes any candidate partition can give one job (its MaxNodes, at most its node
-- count), nil when unknown or unlimited.
local function node_cap(d, part_list)
	local cap = nil
	for name in (candidates(d, part_list) or ""):gmatch("[^,]+") do
		local p = part_list and part_list[name]
		local m = p and math.min(num(p.max_nodes) or math.huge, num(p.total_nodes) or math.huge)
		if not m or m == math.huge then
			return nil
		end
		cap = math.max(cap or 0, m)
	end
	return cap
end

-- GPUs of one job (one array task): the largest of the per-node/-job/-task/-socket forms.
local function gpu_request(d, rec, part_list)
	-- on modify, what the update leaves unset (nil, NO_VAL) is the job record's value
	local function field(k)
		local v = d[k]
		if rec and (v == nil or (type(v) == "number" and not num(v, NO_VAL16))) then
			v = rec[k]
		end
		return v
	end
	-- the most nodes Slurm may give the job: -N's upper end, else one per task (-n 8 may
	-- land on 8 nodes; --ntasks-per-node is then a maximum per node), else -N's lower end;
	-- PrologSlurmctld re-prices the hold to the nodes it really got
	local tasks = num(field("num_tasks"))
	local nodes = num(field("max_nodes"))
	if not nodes then
		local lo = num(field("min_nodes")) or 1
		nodes = math.max(lo, math.min(tasks or 1, node_cap(d, part_list) or math.huge))
	end
	if not tasks then
		tasks = (num(field("ntasks_per_node"), NO_VAL16) or 1) * nodes
	end
	local sockets = num(field("sockets_per_node"), NO_VAL16) or 1
	local best, gtype, shared, per_node = 0, nil, nil, nil
	for _, f in ipairs({ { "tres_per_node", nodes }, { "tres_per_job", 1 },
		{ "tres_per_task", tasks }, { "tres_per_socket", sockets * nodes } }) do
		local n, t, sh = gpus_in(field(f[1]))
		if sh then
			if f[1] ~= "tres_per_node" then
				refuse("gpu-token: shares of a GPU are asked per node, with --gres=" .. sh .. ":N",
					code("ERROR"))
			end
			shared, per_node = sh, n
		elseif n > 0 and shared then
			refuse("gpu-token: a job asks for whole GPUs or for shares of one (shard, mps), not both",
				code("ERROR"))
		end
		if t and gtype and t ~= gtype then
			refuse("gpu-token: one GPU type per job, not " .. gtype .. " and " .. t, code("ERROR"))
		end
		gtype = t or gtype
		if n * f[2] > best then
			best = n * f[2]
		end
	end
	if shared and best ~= per_node * nodes then
		refuse("gpu-token: a job asks for whole GPUs or for shares of one (shard, mps), not both",
			code("ERROR"))
	end
	return best, gtype, shared, per_node
end

-- the request's GRES fields for the daemon: whole GPUs say nothing; shares say which and how many per node
local function share_fields(shared, per_node)
	if not shared then
		return ""
	end
	return " gres=" .. shared .. " per_node=" .. id_text(per_node)
end

-- Minutes the job may run (its own limit, else the partitions' DefaultTime, else MaxTime:
-- the longest over the candidates) and every candidate partition ("a,b").
local function time_limit(d, part_list)
	local names = candidates(d, part_list)
	local minutes = num(d.time_limit)
	if minutes then
		-- above every listed partition's MaxTime the job can never run that long: clamp
		local cap = nil
		for name in (names or ""):gmatch("[^,]+") do
			local p = part_list and part_list[name]
			local m = p and p.max_time
			if m == nil or m == INFINITE or m == NO_VAL then
				cap = nil
				break
			end
			cap = math.max(cap or 0, m)
		end
		if cap and cap > 0 and minutes > cap then
			minutes = cap
		end
		return minutes, names
	end
	if d.time_limit == INFINITE then
		refuse("gpu-token: GPU jobs need a finite time limit; give one with -t/--time (e.g. -t 2:00:00)",
			code("ESLURM_INVALID_TIME_LIMIT"))
	end
	local most = nil
	for name in (names or ""):gmatch("[^,]+") do
		local p = part_list and part_list[name]
		local m = p and (num(p.default_time) or num(p.max_time))
		if not m then
			refuse("gpu-token: partition " .. name .. " has no default or maximum time limit; "
				.. "give the job one with -t/--time (e.g. -t 2:00:00)", code("ESLURM_INVALID_TIME_LIMIT"))
		end
		if not most or m > most then
			most = m
		end
	end
	if not most then
		refuse("gpu-token: the job has no time limit; give it one with -t/--time (e.g. -t 2:00:00)",
			code("ESLURM_INVALID_TIME_LIMIT"))
	end
	return most, names
end

-- "0-9" -> 10, "0-9:2" -> 5, "1,3,5" -> 3, "0-99%10" -> 100
local function array_tasks(spec)
	if not spec or spec == "" then
		return 1
	end
	local total = 0
	for item in spec:gsub("%%.*$", ""):gmatch("[^,]+") do
		local lo, hi, step = item:match("^(%d+)%-(%d+):(%d+)$")
		if not lo then
			lo, hi = item:match("^(%d+)%-(%d+)$")
		end
		if not lo then
			lo = item:match("^(%d+)$")
			hi = lo
		end
		lo, hi, step = tonumber(lo), tonumber(hi), tonumber(step) or 1
		if not lo or hi < lo or step < 1 then
			refuse("gpu-token: cannot read the array spec " .. spec, code("ERROR"))
		end
		total = total + math.floor((hi - lo) / step) + 1
	end
	return total
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

local function unavailable(d, what, why, fields)
	if conf.on_ledger_unavailable == "accept" and what == "submit" then
		d.admin_comment = HOLD_MARK .. "deferred"
		slurm.log_info("gpuledger: result=deferred why=%s %s", esc(why), fields)
		return slurm.SUCCESS
	end
	slurm.log_info("gpuledger: result=unavailable op=%s why=%s %s", what, esc(why), fields)
	refuse("gpu-token: the GPU ledger is unavailable (" .. why .. "); job refused, try again shortly",
		code("ERROR"))
end

local function submit(d, part_list)
	if not asks_gpu(d) then
		return slurm.SUCCESS
	end
	-- gpuledger:test-hook (tests replace this line to force a Lua error)
	local t0 = now()
	local gpus, gtype, shared, per_node = gpu_request(d, nil, part_list)
	local account = d.account or d.default_account
	local user = d.user_name or id_text(d.user_id)
	if account and conf.free_accounts[account] then
		slurm.log_info("gpuledger: result=free user=%s account=%s gpus=%d", esc(user), esc(account), gpus)
		return slurm.SUCCESS
	end
	if gpus <= 0 then
		return slurm.SUCCESS
	end
	local token = token_of(d)
	if not token then
		slurm.log_info("gpuledger: result=refused reason=no_token user=%s account=%s gpus=%d",
			esc(user), esc(account or ""), gpus)
		refuse("gpu-token: this job asks for " .. id_text(gpus) .. " GPU(s) but carries no GPU token; submit it with "
			.. "--gpu-token=@FILE (or --gpu-token=TOKEN, $GPU_TOKEN, ~/.config/gpuledger/token); "
			.. "see `gpuledger balance` for your tokens", code("ESLURM_ACCESS_DENIED"))
	end
	local minutes, partition = time_limit(d, part_list)
	local tasks = array_tasks(d.array_inx)
	key_counter = key_counter + 1
	local fields = string.format("user=%s account=%s partition=%s gpus=%d type=%s seconds=%d tasks=%d",
		esc(user), esc(account or ""), esc(partition or ""), gpus, esc(gtype or ""), minutes * 60, tasks)
		.. share_fields(shared, per_node) .. (d.qos and d.qos ~= "" and (" qos=" .. esc(d.qos)) or "")
	local line = "op=reserve token=" .. esc(token) .. " " .. fields .. " uid=" .. id_text(d.user_id)
		.. " key=" .. key_prefix .. key_counter
		.. (conf.cluster and (" cluster=" .. esc(conf.cluster)) or "") .. "\n"
	local resp, err = call(line)
	if not resp then
		return unavailable(d, "submit", err, fields)
	end
	local r = parse(resp)
	local us = math.floor((now() - t0) * 1e6)
	if r.ok == "1" and r.hold and r.token_id then
		d.admin_comment = HOLD_MARK .. "hold=" .. r.hold .. ";token=" .. r.token_id
		slurm.log_info("gpuledger: result=held hold=%s token=%s amount=%s hours=%s %s us=%d",
			r.hold, r.token_id, r.amount or "", r.hours or "", fields, us)
		return slurm.SUCCESS
	end
	if UNAVAILABLE[r.reason or ""] or r.ok ~= "0" then
		return unavailable(d, "submit", r.message or "bad reply", fields)
	end
	slurm.log_info("gpuledger: result=refused reason=%s token=%s %s us=%d", esc(r.reason or ""),
		esc(r.token_id or ""), fields, us)
	refuse("gpu-token: " .. (r.message or r.reason or "refused"), code(REASON_CODES[r.reason] or "ESLURM_ACCESS_DENIED"))
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

local function modify(d, rec, part_list, uid)
	local old = rec.admin_comment
	local new = d.admin_comment
	if new ~= nil and new ~= old and uid ~= 0 then
		local ours = function(s)
			return s and s:sub(1, #HOLD_MARK) == HOLD_MARK
		end
		if ours(old) or ours(new) then
			refuse("gpu-token: AdminComment holds the job's GPU-token hold and cannot be changed",
				code("ESLURM_ACCESS_DENIED"))
		end
	end
	local hold = old and old:match("^gpuledger:hold=(hold_%x+);")
	local new_time = d.time_limit ~= nil and d.time_limit ~= NO_VAL
	local new_gpus = d.tres_per_node ~= nil or d.tres_per_job ~= nil or d.tres_per_task ~= nil
		or d.tres_per_socket ~= nil
	local new_shape = false -- a new node/task/socket count multiplies per-node/-task GPUs
	for _, k in ipairs({ "min_nodes", "max_nodes", "num_tasks", "ntasks_per_node", "sockets_per_node" }) do
		if d[k] ~= nil and num(d[k], NO_VAL16) then
			new_shape = true
		end
	end
	local new_part = d.partition ~= nil and d.partition ~= ""
	local new_account = d.account ~= nil and d.account ~= ""
	if not (new_time or new_gpus or new_shape or new_part or new_account) then
		return slurm.SUCCESS
	end
	local account = d.account or rec.account
	local free = account and conf.free_accounts[account]
	if not hold then
		if new_gpus and (old == nil or old:sub(1, #HOLD_MARK) ~= HOLD_MARK) and asks_gpu(d) and not free then
			local gpus = gpu_request(d, rec, part_list)
			if gpus > 0 then
				refuse("gpu-token: GPUs cannot be added to a job submitted without them; cancel it and "
					.. "submit again with --gpu-token", code("ESLURM_ACCESS_DENIED"))
			end
		end
		return slurm.SUCCESS -- deferred jobs are priced by the prolog with their final limits
	end
	-- A held job: the ledger re-prices it and checks the token's scopes against the job as
	-- changed (GPU type, every candidate partition, account).
	local line = "op=resize hold=" .. hold
	if new_time then
		if d.time_limit == INFINITE then
			refuse("gpu-token: GPU jobs need a finite time limit", code("ESLURM_INVALID_TIME_LIMIT"))
		end
		line = line .. " seconds=" .. id_text(int(d.time_limit) * 60)
	end
	if new_gpus or new_shape then
		-- The job record carries no task or socket counts: GPUs per task/socket cannot be
		-- recounted here, so such a change could only be priced by guessing. Refuse it.
		for _, f in ipairs({ "tres_per_task", "tres_per_socket" }) do
			local v = d[f] or rec[f]
			if v and asks_gpu({ [f] = v }) then
				refuse("gpu-token: a pending job that asks for GPUs per task or per socket cannot change "
					.. "its GPUs, nodes or tasks; cancel it and submit it again", code("ESLURM_ACCESS_DENIED"))
			end
		end
		local gpus, gtype, shared, per_node = gpu_request(d, rec, part_list)
		if gpus <= 0 then
			line = "op=void hold=" .. hold .. " reason=job%20modified%20to%20use%20no%20GPU"
		else
			line = line .. " gpus=" .. id_text(gpus) .. " type=" .. esc(gtype or "")
				.. (shared and share_fields(shared, per_node) or " gres=gpu")
		end
	end
	if line:sub(1, 9) == "op=resize" then
		if new_part then
			line = line .. " partition=" .. esc(d.partition)
		end
		if new_account then
			line = line .. " account=" .. esc(d.account)
		end
	end
	local resp, err = call(line .. "\n")
	local r = resp and parse(resp) or { reason = "unavailable", message = err }
	if r.ok == "1" then
		slurm.log_info("gpuledger: result=%s job=%s%s hold=%s amount=%s delta=%s uid=%d",
			line:match("^op=(%w+)"), id_text(rec.job_id), sluid_text(rec), hold, r.amount or "",
			r.delta or "", int(uid) or -1)
		if line:sub(1, 7) == "op=void" then
			d.admin_comment = ""
		end
		return slurm.SUCCESS
	end
	slurm.log_info("gpuledger: result=refused op=modify job=%s%s hold=%s reason=%s", id_text(rec.job_id),
		sluid_text(rec), hold, esc(r.reason or ""))
	if UNAVAILABLE[r.reason or ""] then
		refuse("gpu-token: the GPU ledger is unavailable (" .. tostring(r.message) .. "); change refused",
			code("ERROR"))
	end
	refuse("gpu-token: " .. (r.message or "change refused"), code(REASON_CODES[r.reason] or "ESLURM_ACCESS_DENIED"))
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
