-- wrk script for every scenario of bench/bench.py (wrk 4.x, LuaJIT).
--
--   wrk ... -s bench/scenario.lua URL -- SCENARIO OFFSET PIDS_FILE TOKENS_FILE SEED [AMOUNT]
--
-- unknown     POST /api/v1/redeem, a never-seen PID per request (every body different)
-- success     POST /api/v1/redeem, the seeded unclaimed PIDs in order from OFFSET (new claims)
-- retry       POST /api/v1/redeem, PIDs already claimed (cycling through the file)
-- introspect  GET /api/v1/token/{token}, existing tokens (cycling)
-- mixed       per 20 requests: 16 introspect, 3 retry, 1 unknown
-- spend       POST /api/v1/token/{token}/spend of AMOUNT (internal site), tokens cycling, each
--             request with a new Idempotency-Key
-- spend-hot   the same on one token: TOKENS_FILE holds only that one
--
-- Each response is counted under "<status>/<body status or error code>" so bench.py can tell an
-- expected 404 (unknown PID) from a wrong one; done() prints one machine-readable line.  A spend
-- answered from an earlier request's key counts as "<status>/replayed", and in spend-hot a 200
-- whose balance an earlier 200 of the run already showed (two spends seeing one balance: a lost
-- update) as "200/duplicate_balance": both are errors for bench.py.

local scenario, offset, prefix, spend_body = "unknown", 0, 1, ""
local spending = false -- spend or spend-hot
local pids, tokens = {}, {}
local headers = { ["Content-Type"] = "application/json" }
local balances = {} -- spend-hot: the balances its 200 answers showed

-- Globals: thread:get() copies them out of each thread's Lua state in done().
statuses = {}
sent = 0

local function read_lines(path)
  local lines = {}
  if path == nil or path == "" or path == "-" then
    return lines
  end
  for line in io.lines(path) do
    if line ~= "" then
      lines[#lines + 1] = line
    end
  end
  return lines
end

function init(args)
  scenario = args[1] or scenario
  spending = scenario == "spend" or scenario == "spend-hot"
  offset = tonumber(args[2]) or 0
  pids = read_lines(args[3])
  tokens = read_lines(args[4])
  math.randomseed(tonumber(args[5]) or os.time())
  -- A random high half per run plus a counter: unique within a run, and a collision with
  -- another run or a seeded PID is a 1 in 2^31 chance.
  prefix = math.random(1, 0x7fffffff)
  spend_body = '{"amount":' .. (tonumber(args[6]) or 1) .. "}"
end

local function redeem(pid)
  return wrk.format("POST", "/api/v1/redeem", headers, '{"pid":"' .. pid .. '"}')
end

local function unknown()
  return redeem(string.format("%08x%08x", prefix, sent))
end

local function cycle(list)
  return list[(offset + sent - 1) % #list + 1]
end

local function introspect()
  return wrk.format("GET", "/api/v1/token/" .. cycle(tokens))
end

local function spend()
  -- The key is unique per request the same way as unknown()'s PIDs: the run's prefix, a counter.
  local spend_headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = string.format("bench-%08x-%x", prefix, sent),
  }
  local path = "/api/v1/token/" .. cycle(tokens) .. "/spend"
  return wrk.format("POST", path, spend_headers, spend_body)
end

function request()
  sent = sent + 1
  if scenario == "unknown" then
    return unknown()
  elseif scenario == "success" then
    -- Past the end of the file this turns into retries, which bench.py counts as errors.
    return redeem(cycle(pids))
  elseif scenario == "retry" then
    return redeem(cycle(pids))
  elseif scenario == "introspect" then
    return introspect()
  elseif scenario == "mixed" then
    local slot = sent % 20
    if slot == 0 then
      return unknown()
    elseif slot <= 3 then
      return redeem(cycle(pids))
    end
    return introspect()
  elseif spending then
    return spend()
  end
  error("unknown scenario " .. scenario)
end

local function label_of(status, headers, body)
  if spending and headers["Idempotent-Replayed"] then
    return "replayed"
  elseif scenario == "spend-hot" and status == 200 then
    local balance = body:match('"balance":(%d+)')
    if balance ~= nil then
      if balances[balance] then
        return "duplicate_balance"
      end
      balances[balance] = true
    end
  end
  return body:match('"status":"([%w_]+)"') or body:match('"code":"([%w_]+)"') or "-"
end

function response(status, headers, body)
  local label = label_of(status, headers, body)
  local key = status .. "/" .. label
  statuses[key] = (statuses[key] or 0) + 1
end

local threads = {}

function setup(thread)
  threads[#threads + 1] = thread
end

function done(summary, latency, _)
  local counts, total_sent = {}, 0
  for _, thread in ipairs(threads) do
    total_sent = total_sent + thread:get("sent")
    for key, n in pairs(thread:get("statuses")) do
      counts[key] = (counts[key] or 0) + n
    end
  end
  local parts = {}
  for key, n in pairs(counts) do
    parts[#parts + 1] = string.format('"%s":%d', key, n)
  end
  local e = summary.errors
  io.write(string.format(
    'BENCH {"requests":%d,"duration_us":%d,"sent":%d,"connect":%d,"read":%d,"write":%d,'
      .. '"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, total_sent, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    table.concat(parts, ",")
  ))
end
