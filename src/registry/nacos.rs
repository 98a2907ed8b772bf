//! Nacos's naming protocols over the one registry, so that the clients of
//! Nacos (the seed's Spring Cloud Alibaba services, and every SDK) move to
//! shop-mesh by changing nothing but the process they start:
//!
//! - `open_api.rs`: the 1.x open API over HTTP under `/nacos/v1/ns/` (and
//!   its login) on the registry's own port;
//! - `remote.rs`: the 2.x gRPC API on the registry's port + 1000, with its
//!   connections and the push of a subscribed service's changes.
//!
//! Both are adapters over the registry's gRPC handlers, as the JSON API is:
//! a Nacos request is checked with the same rules, the same credentials
//! (a shop-mesh token is the Nacos accessToken) and the same messages, and
//! whatever a Nacos client registers is what shop-mesh's own watch and
//! registrar see, and the other way round. Nacos's names map one to one:
//! `namespaceId` (`public`), `groupName` (`DEFAULT_GROUP`), a service name
//! that may carry its group (`group@@name`), `clusterName` (`DEFAULT`),
//! weight, enabled, ephemeral and metadata, with Nacos's
//! `preserved.heart.beat.*` metadata as the instance's timings.

pub(super) mod open_api;
mod remote;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use tonic::Code;

use super::RegistryService;
use crate::pb::registry as pb;
use crate::pb::registry::registry_server::Registry as _;

pub(super) use remote::Remote;

/// How Nacos joins a group and a service name into one.
const GROUPED: &str = "@@";

/// The metadata keys by which Nacos clients ask for an instance's timings,
/// in milliseconds.
const HEARTBEAT_INTERVAL_KEY: &str = "preserved.heart.beat.interval";
const UNHEALTHY_TIMEOUT_KEY: &str = "preserved.heart.beat.timeout";
const DELETE_TIMEOUT_KEY: &str = "preserved.ip.delete.timeout";

/// How long Nacos clients may cache a service's instances, as Nacos
/// answers it.
const CACHE_MILLIS: u64 = 10_000;

/// The group and name of a Nacos service name, which may carry its group
/// (`group@@name`); a group given apart must then agree with it.
fn split_service(service: &str, group: &str) -> Result<(String, String), tonic::Status> {
    match service.split_once(GROUPED) {
        None => Ok((group.to_string(), service.to_string())),
        Some((named, name)) if group.is_empty() || group == named => {
            Ok((named.to_string(), name.to_string()))
        }
        Some((named, _)) => Err(tonic::Status::invalid_argument(format!(
            "serviceName {service:?} names group {named:?}, but groupName is {group:?}"
        ))),
    }
}

/// `group@@name`, as Nacos names a service in its answers.
fn grouped(group: &str, name: &str) -> String {
    format!("{group}{GROUPED}{name}")
}

/// An instance as a Nacos client describes it (the 2.x JSON, and the 1.x
/// beat's): every field may be missing or null.
#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct NacosInstance {
    ip: Option<String>,
    #[serde(deserialize_with = "loose::number")]
    port: Option<i64>,
    #[serde(deserialize_with = "loose::number")]
    weight: Option<f64>,
    #[serde(deserialize_with = "loose::flag")]
    enabled: Option<bool>,
    #[serde(deserialize_with = "loose::flag")]
    ephemeral: Option<bool>,
    cluster_name: Option<String>,
    /// The 1.x beat's name for the cluster.
    cluster: Option<String>,
    #[serde(deserialize_with = "loose::labels")]
    metadata: Option<HashMap<String, String>>,
}

/// Fields as Nacos's clients send them, which is not always as typed: the
/// npm client copies what its caller gave (`port: process.env.PORT`,
/// `metadata: {version: 2}`) into its beats, and Nacos's own server reads
/// them all. A value of the wrong kind is still refused, naming it.
mod loose {
    use std::collections::HashMap;
    use std::str::FromStr;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    /// A number, or a string holding one.
    pub fn number<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr + for<'a> Deserialize<'a>,
    {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::String(text) => text
                .trim()
                .parse()
                .map(Some)
                .map_err(|_| D::Error::custom(format!("{text:?} is not a number"))),
            number @ Value::Number(_) => T::deserialize(number)
                .map(Some)
                .map_err(|_| D::Error::custom("a number out of range")),
            other => Err(D::Error::custom(format!("{other} is not a number"))),
        }
    }

    /// A boolean, or `"true"` or `"false"`.
    pub fn flag<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Value::deserialize(d)? {
            Value::Null => Ok(None),
            Value::Bool(b) => Ok(Some(b)),
            Value::String(text) if text.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Value::String(text) if text.eq_ignore_ascii_case("false") => Ok(Some(false)),
            other => Err(D::Error::custom(format!("{other} is not true or false"))),
        }
    }

    /// Labels whose values may be numbers or booleans (kept as their
    /// text); a null value is no label.
    pub fn labels<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<HashMap<String, String>>, D::Error> {
        let Some(object) = Option::<serde_json::Map<String, Value>>::deserialize(d)? else {
            return Ok(None);
        };
        object
            .into_iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| match v {
                Value::String(text) => Ok((k, text)),
                Value::Number(_) | Value::Bool(_) => Ok((k, v.to_string())),
                other => Err(D::Error::custom(format!(
                    "metadata {k:?}: {other} is not a label's value"
                ))),
            })
            .collect::<Result<_, _>>()
            .map(Some)
    }
}

/// Where an instance is and what it is, in shop-mesh's terms.
struct Placed<'a> {
    namespace: &'a str,
    group: &'a str,
    service: &'a str,
}

impl NacosInstance {
    /// The registry's instance for this Nacos one, in `at`: Nacos's
    /// defaults where a field is missing, its timing metadata as timings.
    fn to_pb(&self, at: &Placed<'_>) -> Result<pb::Instance, tonic::Status> {
        let ip = self.ip.clone().ok_or_else(|| missing("ip"))?;
        let port = self.port.ok_or_else(|| missing("port"))?;
        let port = u32::try_from(port)
            .ok()
            .filter(|p| (1..=65535).contains(p))
            .ok_or_else(|| {
                tonic::Status::invalid_argument(format!("port: {port} is not a port (1 to 65535)"))
            })?;
        let metadata = self.metadata.clone().unwrap_or_default();
        let timings = Timings::of(&metadata)?;
        Ok(pb::Instance {
            namespace: at.namespace.to_string(),
            group: at.group.to_string(),
            service: at.service.to_string(),
            cluster: self
                .cluster_name
                .clone()
                .or_else(|| self.cluster.clone())
                .unwrap_or_default(),
            ip,
            port,
            weight: Some(self.weight.unwrap_or(1.0)),
            enabled: Some(self.enabled.unwrap_or(true)),
            ephemeral: Some(self.ephemeral.unwrap_or(true)),
            heartbeat_interval_ms: timings.heartbeat_interval_ms,
            unhealthy_timeout_ms: timings.unhealthy_timeout_ms,
            delete_timeout_ms: timings.delete_timeout_ms,
            metadata,
            ..Default::default()
        })
    }
}

/// The timings an instance's metadata asks for, in milliseconds.
struct Timings {
    heartbeat_interval_ms: Option<u64>,
    unhealthy_timeout_ms: Option<u64>,
    delete_timeout_ms: Option<u64>,
}

impl Timings {
    /// Nacos's `preserved.heart.beat.*` keys of `metadata`; a value that is
    /// not a number is refused, naming its key.
    fn of(metadata: &HashMap<String, String>) -> Result<Self, tonic::Status> {
        let timing = |key: &str| -> Result<Option<u64>, tonic::Status> {
            metadata
                .get(key)
                .map(|v| {
                    v.trim().parse::<u64>().map_err(|_| {
                        tonic::Status::invalid_argument(format!(
                            "metadata {key}: {v:?} is not a number of milliseconds"
                        ))
                    })
                })
                .transpose()
        };
        Ok(Self {
            heartbeat_interval_ms: timing(HEARTBEAT_INTERVAL_KEY)?,
            unhealthy_timeout_ms: timing(UNHEALTHY_TIMEOUT_KEY)?,
            delete_timeout_ms: timing(DELETE_TIMEOUT_KEY)?,
        })
    }
}

/// Nacos's answer to a request without a field it needs.
fn missing(param: &str) -> tonic::Status {
    tonic::Status::invalid_argument(format!("Param '{param}' is required."))
}

/// An instance as Nacos answers it, borrowed from the registry's answer
/// (serialized straight from it: a list is the hot read).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Host<'a> {
    instance_id: &'a str,
    ip: &'a str,
    port: u32,
    weight: f64,
    healthy: bool,
    enabled: bool,
    ephemeral: bool,
    cluster_name: &'a str,
    service_name: &'a str,
    metadata: &'a HashMap<String, String>,
    instance_heart_beat_interval: u64,
    instance_heart_beat_time_out: u64,
    ip_delete_timeout: u64,
    instance_id_generator: &'static str,
}

impl<'a> Host<'a> {
    fn of(i: &'a pb::Instance, service_name: &'a str) -> Self {
        Host {
            instance_id: &i.instance_id,
            ip: &i.ip,
            port: i.port,
            weight: i.weight.unwrap_or(1.0),
            healthy: i.healthy,
            enabled: i.enabled.unwrap_or(true),
            ephemeral: i.ephemeral.unwrap_or(true),
            cluster_name: &i.cluster,
            service_name,
            metadata: &i.metadata,
            instance_heart_beat_interval: i.heartbeat_interval_ms.unwrap_or_default(),
            instance_heart_beat_time_out: i.unhealthy_timeout_ms.unwrap_or_default(),
            ip_delete_timeout: i.delete_timeout_ms.unwrap_or_default(),
            instance_id_generator: "simple",
        }
    }
}

/// A service's instances as Nacos answers them (its `ServiceInfo`).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ServiceInfo<'a> {
    name: &'a str,
    /// The 1.x open API's name for `name`.
    #[serde(skip_serializing_if = "Option::is_none")]
    dom: Option<&'a str>,
    group_name: &'a str,
    clusters: &'a str,
    cache_millis: u64,
    hosts: Vec<Host<'a>>,
    last_ref_time: u64,
    checksum: &'static str,
    all_ips: bool,
    reach_protection_threshold: bool,
    valid: bool,
}

/// A service's instances as Nacos answers them: `name` as this
/// protocol's clients key it, the clusters they asked for echoed, and
/// `lastRefTime` as given (a client drops an answer no newer than the one
/// it holds). `service_name` is the grouped name each host carries.
fn service_info<'a>(
    name: &'a str,
    group: &'a str,
    clusters: &'a str,
    service: Option<&'a pb::GetServiceResponse>,
    service_name: &'a str,
    last_ref_time: u64,
) -> ServiceInfo<'a> {
    let hosts = service
        .map(|s| {
            s.instances
                .iter()
                .map(|i| Host::of(i, service_name))
                .collect()
        })
        .unwrap_or_default();
    ServiceInfo {
        name,
        dom: None,
        group_name: group,
        clusters,
        cache_millis: CACHE_MILLIS,
        hosts,
        last_ref_time,
        checksum: "",
        all_ips: false,
        reach_protection_threshold: service.is_some_and(|s| s.protection_triggered),
        valid: true,
    }
}

/// A service's instances in `clusters` (comma-separated; empty: all), as
/// the registry answers them to `token`; None when it has no such service.
/// `enabled_only` drops disabled instances, which Nacos never hands a
/// subscriber or a 1.x list.
async fn find_service(
    face: &RegistryService,
    token: Option<&str>,
    (namespace, group, service): (&str, &str, &str),
    clusters: &str,
    healthy_only: bool,
    enabled_only: bool,
) -> Result<Option<pb::GetServiceResponse>, tonic::Status> {
    let found = face
        .get_service(with_token(
            token,
            pb::GetServiceRequest {
                namespace: namespace.to_string(),
                group: group.to_string(),
                service: service.to_string(),
                healthy_only,
                clusters: clusters
                    .split(',')
                    .map(str::trim)
                    .filter(|c| !c.is_empty())
                    .map(String::from)
                    .collect(),
            },
        ))
        .await;
    let mut found = match found {
        Ok(found) => found.into_inner(),
        Err(status) if status.code() == Code::NotFound => return Ok(None),
        Err(status) => return Err(status),
    };
    if enabled_only {
        found.instances.retain(|i| i.enabled != Some(false));
    }
    Ok(Some(found))
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The Nacos error code (and HTTP status) for a refusal of the registry's.
fn nacos_code(code: Code) -> u16 {
    match code {
        Code::InvalidArgument | Code::OutOfRange | Code::AlreadyExists => 400,
        Code::Unauthenticated | Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::FailedPrecondition | Code::Aborted => 409,
        Code::ResourceExhausted | Code::Unavailable => 503,
        Code::Unimplemented => 501,
        Code::DeadlineExceeded => 504,
        _ => 500,
    }
}

/// `message` as a request of the registry's gRPC API showing `token`.
fn with_token<T>(token: Option<&str>, message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(token) = token.filter(|t| !t.is_empty())
        && let Ok(value) = format!("Bearer {token}").parse()
    {
        request.metadata_mut().insert("authorization", value);
    }
    request
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_name_may_carry_its_group() {
        assert_eq!(
            split_service("DEFAULT_GROUP@@server-product", "").unwrap(),
            ("DEFAULT_GROUP".into(), "server-product".into())
        );
        assert_eq!(
            split_service("server-product", "G").unwrap(),
            ("G".into(), "server-product".into())
        );
        let err = split_service("A@@server-product", "B").unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("names group \"A\""), "{err:?}");
    }

    #[test]
    fn an_instance_is_read_as_nacos_clients_send_it() {
        let typed: NacosInstance = serde_json::from_str(
            r#"{"ip":"10.0.0.1","port":8080,"weight":1,"enabled":true,"metadata":{"v":"2"}}"#,
        )
        .unwrap();
        assert_eq!(
            (typed.port, typed.weight, typed.enabled),
            (Some(8080), Some(1.0), Some(true))
        );
        let loose: NacosInstance = serde_json::from_str(
            r#"{"ip":"10.0.0.1","port":"8080","weight":"2.5","enabled":"false","metadata":{"v":2,"canary":true,"gone":null}}"#,
        )
        .unwrap();
        assert_eq!(
            (loose.port, loose.weight, loose.enabled),
            (Some(8080), Some(2.5), Some(false))
        );
        let metadata = loose.metadata.unwrap();
        assert_eq!(
            (metadata["v"].as_str(), metadata["canary"].as_str()),
            ("2", "true")
        );
        assert!(!metadata.contains_key("gone"));
        let wrong = serde_json::from_str::<NacosInstance>(r#"{"port":"eighty"}"#).unwrap_err();
        assert!(wrong.to_string().contains("eighty"), "{wrong}");
        assert!(serde_json::from_str::<NacosInstance>(r#"{"metadata":{"a":[1]}}"#).is_err());
    }

    #[test]
    fn nacos_timing_metadata_become_the_instances_timings() {
        let at = Placed {
            namespace: "",
            group: "",
            service: "s",
        };
        let instance = NacosInstance {
            ip: Some("10.0.0.1".into()),
            port: Some(80),
            metadata: Some(HashMap::from([(
                HEARTBEAT_INTERVAL_KEY.into(),
                "2000".into(),
            )])),
            ..Default::default()
        };
        let pb = instance.to_pb(&at).unwrap();
        assert_eq!(pb.heartbeat_interval_ms, Some(2000));
        assert_eq!(pb.weight, Some(1.0));
        let bad = NacosInstance {
            metadata: Some(HashMap::from([(DELETE_TIMEOUT_KEY.into(), "soon".into())])),
            ..instance
        };
        let err = bad.to_pb(&at).unwrap_err();
        assert!(
            err.message().contains("preserved.ip.delete.timeout"),
            "{err:?}"
        );
        let no_port = NacosInstance {
            ip: Some("10.0.0.1".into()),
            port: Some(70000),
            ..Default::default()
        };
        assert!(no_port.to_pb(&at).unwrap_err().message().contains("70000"));
    }
}
