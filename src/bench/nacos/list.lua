-- wrk script: the instance-list query Nacos's 1.x clients poll, of one
-- service (the bench registers its instances first).
wrk.method = "GET"
wrk.path = "/nacos/v1/ns/instance/list?serviceName=DEFAULT_GROUP%40%40bench-list"
  .. "&groupName=DEFAULT_GROUP&namespaceId=public&clusters=&healthyOnly=false"
