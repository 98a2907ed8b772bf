-- wrk script: registrations over Nacos's 1.x HTTP API, each a new
-- ephemeral instance (a form body, as Nacos's Java client sends it),
-- 100 instances to a service. Each wrk thread has its own 10.<thread>/16.
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("id", threads)
end

local sent = 0
function request()
  sent = sent + 1
  local ip = string.format("10.%d.%d.%d", id, math.floor(sent / 256) % 256, sent % 256)
  local port = 1024 + math.floor(sent / 65536)
  local service = string.format("bench-%d-%d", id, math.floor(sent / 100))
  local body = "serviceName=" .. service .. "&ip=" .. ip .. "&port=" .. port .. "&ephemeral=true"
  return wrk.format("POST", "/nacos/v1/ns/instance",
    { ["Content-Type"] = "application/x-www-form-urlencoded" }, body)
end
