//! A client of Kafka's group coordinator for a group protocol of our own.
//!
//! librdkafka joins groups only with protocol type `consumer` (its pluggable assignors are an
//! unmerged PR), so the worker speaks the five requests it needs itself, with the message
//! codecs of the `kafka-protocol` crate: FindCoordinator, JoinGroup, SyncGroup, Heartbeat and
//! LeaveGroup. One connection to the coordinator, one request at a time: the membership loop
//! never needs two at once (no heartbeats while joining, as in Kafka's own clients).
//!
//! Versions are fixed at ones every Kafka since 2.3 and Redpanda serve (JoinGroup v5 has the
//! member id handshake of KIP-394; none of them is a "flexible" version), so no ApiVersions
//! round trip is needed.

use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ApiKey, FindCoordinatorRequest, FindCoordinatorResponse, GroupId, HeartbeatRequest,
    HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest, RequestHeader,
    ResponseHeader, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    SaslHandshakeResponse, SyncGroupRequest, SyncGroupResponse,
    join_group_request::JoinGroupRequestProtocol, leave_group_request::MemberIdentity,
    sync_group_request::SyncGroupRequestAssignment,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::scram::{ScramClient, ScramError, plain_message};
use super::security::{BrokerStream, Sasl, SaslMechanism, Security};

const FIND_COORDINATOR_VERSION: i16 = 2;
const JOIN_GROUP_VERSION: i16 = 5;
const SYNC_GROUP_VERSION: i16 = 3;
const HEARTBEAT_VERSION: i16 = 3;
const LEAVE_GROUP_VERSION: i16 = 3;
const LEAVE_GROUP_SINGLE_MEMBER_VERSION: i16 = 1;
/// v1: the SASL tokens travel in SaslAuthenticate requests (KIP-152).
const SASL_HANDSHAKE_VERSION: i16 = 1;
const SASL_AUTHENTICATE_VERSION: i16 = 1;
/// Answers larger than this are refused: a group's metadata is a few KiB per worker.
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Kafka error codes the membership loop acts on.
pub mod code {
    pub const NONE: i16 = 0;
    pub const COORDINATOR_LOAD_IN_PROGRESS: i16 = 14;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const NOT_COORDINATOR: i16 = 16;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
    pub const MEMBER_ID_REQUIRED: i16 = 79;
    pub const FENCED_INSTANCE_ID: i16 = 82;
}

#[derive(Debug, Error)]
pub enum CoordinatorError {
    #[error("cannot reach {address}: {source}")]
    Connect {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connection to the group coordinator failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("the group coordinator did not answer {request} within {timeout:?}")]
    Timeout {
        request: &'static str,
        timeout: Duration,
    },
    #[error("cannot encode or decode {request}: {reason}")]
    Protocol {
        request: &'static str,
        reason: String,
    },
    /// The coordinator answered with an error code (see [`code`]).
    #[error("{request} failed with Kafka error {code}{}", .message.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Kafka {
        request: &'static str,
        code: i16,
        message: Option<String>,
    },
    #[error("no bootstrap server in '{0}'")]
    NoBootstrap(String),
    #[error("SASL {mechanism} authentication failed: {source}")]
    Scram {
        mechanism: &'static str,
        #[source]
        source: ScramError,
    },
}

impl CoordinatorError {
    pub fn code(&self) -> Option<i16> {
        match self {
            Self::Kafka { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The coordinator moved or is starting: find it again and retry.
    pub fn needs_rediscovery(&self) -> bool {
        matches!(
            self.code(),
            Some(
                code::NOT_COORDINATOR
                    | code::COORDINATOR_NOT_AVAILABLE
                    | code::COORDINATOR_LOAD_IN_PROGRESS
            )
        ) || matches!(
            self,
            Self::Io(_) | Self::Connect { .. } | Self::Timeout { .. }
        )
    }
}

type Result<T> = std::result::Result<T, CoordinatorError>;

/// One member's entry in a JoinGroup answer, as the leader sees it.
#[derive(Debug, Clone)]
pub struct JoinedMember {
    pub member_id: String,
    pub metadata: Bytes,
}

/// What a successful JoinGroup tells this member.
#[derive(Debug, Clone)]
pub struct Joined {
    pub generation: i32,
    pub member_id: String,
    pub leader_id: String,
    /// Every member with its metadata; empty unless this member is the leader.
    pub members: Vec<JoinedMember>,
}

impl Joined {
    pub fn is_leader(&self) -> bool {
        self.member_id == self.leader_id
    }
}

/// A connection to a group's coordinator.
pub struct Coordinator {
    stream: Box<dyn BrokerStream>,
    client_id: StrBytes,
    group_id: GroupId,
    correlation: i32,
    request_timeout: Duration,
}

impl Coordinator {
    /// Asks the bootstrap servers (each in turn) which broker coordinates `group_id`, and
    /// connects to it.
    pub async fn connect(
        bootstrap_servers: &str,
        group_id: &str,
        client_id: &str,
        security: &Security,
        request_timeout: Duration,
    ) -> Result<Self> {
        let mut last = None;
        for address in bootstrap_servers
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            match Self::via(address, group_id, client_id, security, request_timeout).await {
                Ok(coordinator) => return Ok(coordinator),
                Err(error) => last = Some(error),
            }
        }
        Err(last.unwrap_or_else(|| CoordinatorError::NoBootstrap(bootstrap_servers.to_string())))
    }

    async fn via(
        bootstrap: &str,
        group_id: &str,
        client_id: &str,
        security: &Security,
        request_timeout: Duration,
    ) -> Result<Self> {
        let mut bootstrap =
            Self::open(bootstrap, group_id, client_id, security, request_timeout).await?;
        let request = FindCoordinatorRequest::default()
            .with_key(StrBytes::from_string(group_id.to_string()))
            .with_key_type(0);
        let response: FindCoordinatorResponse = bootstrap
            .call(
                ApiKey::FindCoordinator,
                "FindCoordinator",
                FIND_COORDINATOR_VERSION,
                &request,
                request_timeout,
            )
            .await?;
        check(
            "FindCoordinator",
            response.error_code,
            response.error_message.as_ref(),
        )?;
        let address = format!("{}:{}", response.host.as_str(), response.port);
        Self::open(&address, group_id, client_id, security, request_timeout).await
    }

    /// Connects (with TLS if configured) and authenticates (with SASL if configured).
    async fn open(
        address: &str,
        group_id: &str,
        client_id: &str,
        security: &Security,
        request_timeout: Duration,
    ) -> Result<Self> {
        let stream = tokio::time::timeout(request_timeout, security.connect(address))
            .await
            .map_err(|_| CoordinatorError::Timeout {
                request: "connect",
                timeout: request_timeout,
            })?
            .map_err(|source| CoordinatorError::Connect {
                address: address.to_string(),
                source,
            })?;
        let mut coordinator = Self {
            stream,
            client_id: StrBytes::from_string(client_id.to_string()),
            group_id: GroupId(StrBytes::from_string(group_id.to_string())),
            correlation: 0,
            request_timeout,
        };
        if let Some(sasl) = &security.sasl {
            coordinator.authenticate(sasl).await?;
        }
        Ok(coordinator)
    }

    /// SaslHandshake, then the mechanism's exchange in SaslAuthenticate requests. A SCRAM
    /// server must prove it knows the password too.
    async fn authenticate(&mut self, sasl: &Sasl) -> Result<()> {
        let mechanism = sasl.mechanism.name();
        let request =
            SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism));
        let response: SaslHandshakeResponse = self
            .call(
                ApiKey::SaslHandshake,
                "SaslHandshake",
                SASL_HANDSHAKE_VERSION,
                &request,
                self.request_timeout,
            )
            .await?;
        if response.error_code != code::NONE {
            let offered: Vec<&str> = response.mechanisms.iter().map(|m| m.as_str()).collect();
            let offered = format!("the broker offers {}", offered.join(", "));
            return check("SaslHandshake", response.error_code, Some(&offered.into()));
        }
        let scram_failed = |source| CoordinatorError::Scram { mechanism, source };
        match sasl.mechanism {
            SaslMechanism::Plain => {
                self.sasl_step(plain_message(&sasl.username, &sasl.password))
                    .await?;
            }
            SaslMechanism::Scram(hash) => {
                let mut client =
                    ScramClient::new(hash, &sasl.username, ScramClient::random_nonce());
                let server_first = self.sasl_step(client.first()).await?;
                let reply = client
                    .reply(&sasl.password, &server_first)
                    .map_err(scram_failed)?;
                let server_final = self.sasl_step(reply).await?;
                client.verify(&server_final).map_err(scram_failed)?;
            }
        }
        Ok(())
    }

    /// One SASL token out, the broker's token back.
    async fn sasl_step(&mut self, token: Vec<u8>) -> Result<Bytes> {
        let request = SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from(token));
        let response: SaslAuthenticateResponse = self
            .call(
                ApiKey::SaslAuthenticate,
                "SaslAuthenticate",
                SASL_AUTHENTICATE_VERSION,
                &request,
                self.request_timeout,
            )
            .await?;
        check(
            "SaslAuthenticate",
            response.error_code,
            response.error_message.as_ref(),
        )?;
        Ok(response.auth_bytes)
    }

    /// Joins (or rejoins) the group. `member_id` is empty on a first join; Kafka then answers
    /// MEMBER_ID_REQUIRED with the id to join with (KIP-394), which this call handles.
    pub async fn join(
        &mut self,
        member_id: &str,
        protocol_type: &str,
        protocol_name: &str,
        metadata: Bytes,
        session_timeout: Duration,
        rebalance_timeout: Duration,
    ) -> Result<Joined> {
        let mut member_id = member_id.to_string();
        for _ in 0..2 {
            let request = JoinGroupRequest::default()
                .with_group_id(self.group_id.clone())
                .with_session_timeout_ms(millis(session_timeout))
                .with_rebalance_timeout_ms(millis(rebalance_timeout))
                .with_member_id(StrBytes::from_string(member_id.clone()))
                .with_protocol_type(StrBytes::from_string(protocol_type.to_string()))
                .with_protocols(vec![
                    JoinGroupRequestProtocol::default()
                        .with_name(StrBytes::from_string(protocol_name.to_string()))
                        .with_metadata(metadata.clone()),
                ]);
            // The coordinator holds a JoinGroup until every member rejoined or the rebalance
            // timeout passed.
            let timeout = rebalance_timeout + self.request_timeout;
            let response: JoinGroupResponse = self
                .call(
                    ApiKey::JoinGroup,
                    "JoinGroup",
                    JOIN_GROUP_VERSION,
                    &request,
                    timeout,
                )
                .await?;
            if response.error_code == code::MEMBER_ID_REQUIRED {
                member_id = response.member_id.as_str().to_string();
                continue;
            }
            check("JoinGroup", response.error_code, None)?;
            return Ok(Joined {
                generation: response.generation_id,
                member_id: response.member_id.as_str().to_string(),
                leader_id: response.leader.as_str().to_string(),
                members: response
                    .members
                    .into_iter()
                    .map(|m| JoinedMember {
                        member_id: m.member_id.as_str().to_string(),
                        metadata: m.metadata,
                    })
                    .collect(),
            });
        }
        Err(CoordinatorError::Kafka {
            request: "JoinGroup",
            code: code::MEMBER_ID_REQUIRED,
            message: Some("asked for a member id twice".into()),
        })
    }

    /// Sends the leader's assignments (empty from followers) and returns this member's.
    pub async fn sync(
        &mut self,
        generation: i32,
        member_id: &str,
        assignments: Vec<(String, Bytes)>,
    ) -> Result<Bytes> {
        let request = SyncGroupRequest::default()
            .with_group_id(self.group_id.clone())
            .with_generation_id(generation)
            .with_member_id(StrBytes::from_string(member_id.to_string()))
            .with_assignments(
                assignments
                    .into_iter()
                    .map(|(member, assignment)| {
                        SyncGroupRequestAssignment::default()
                            .with_member_id(StrBytes::from_string(member))
                            .with_assignment(assignment)
                    })
                    .collect(),
            );
        let timeout = self.request_timeout;
        let answer = self
            .exchange(
                ApiKey::SyncGroup,
                "SyncGroup",
                SYNC_GROUP_VERSION,
                &request,
                timeout,
            )
            .await?;
        // An error answer may carry a null assignment, which the schema does not allow and
        // the codec refuses (librdkafka's mock cluster sends one): read the error code first.
        let (_throttle, error_code) = head(&answer, "SyncGroup")?;
        check("SyncGroup", error_code, None)?;
        let response = decode::<SyncGroupResponse>(answer, "SyncGroup", SYNC_GROUP_VERSION)?;
        check("SyncGroup", response.error_code, None)?;
        Ok(response.assignment)
    }

    pub async fn heartbeat(&mut self, generation: i32, member_id: &str) -> Result<()> {
        let request = HeartbeatRequest::default()
            .with_group_id(self.group_id.clone())
            .with_generation_id(generation)
            .with_member_id(StrBytes::from_string(member_id.to_string()));
        let timeout = self.request_timeout;
        let response: HeartbeatResponse = self
            .call(
                ApiKey::Heartbeat,
                "Heartbeat",
                HEARTBEAT_VERSION,
                &request,
                timeout,
            )
            .await?;
        check("Heartbeat", response.error_code, None)
    }

    /// Leaves the group at once, so the others rebalance now instead of after the session
    /// timeout.
    pub async fn leave(&mut self, member_id: &str) -> Result<()> {
        match self.leave_as(member_id, LEAVE_GROUP_VERSION).await {
            // librdkafka's mock cluster reads every LeaveGroup as v0 (one member id, where v3
            // has a list), so it does not know the member it reads: ask again in v1's shape.
            Err(error) if error.code() == Some(code::UNKNOWN_MEMBER_ID) => self
                .leave_as(member_id, LEAVE_GROUP_SINGLE_MEMBER_VERSION)
                .await
                .map_err(|_| error),
            left => left,
        }
    }

    async fn leave_as(&mut self, member_id: &str, version: i16) -> Result<()> {
        let member_id = StrBytes::from_string(member_id.to_string());
        let request = if version >= 3 {
            LeaveGroupRequest::default()
                .with_group_id(self.group_id.clone())
                .with_members(vec![MemberIdentity::default().with_member_id(member_id)])
        } else {
            LeaveGroupRequest::default()
                .with_group_id(self.group_id.clone())
                .with_member_id(member_id)
        };
        let timeout = self.request_timeout;
        let answer = self
            .exchange(ApiKey::LeaveGroup, "LeaveGroup", version, &request, timeout)
            .await?;
        // Only the group-level error matters here; the mock cluster answers v3 with the v0
        // fields alone (no per-member list), which the codec refuses.
        let (_throttle, error_code) = head(&answer, "LeaveGroup")?;
        check("LeaveGroup", error_code, None)
    }

    async fn call<Req, Resp>(
        &mut self,
        key: ApiKey,
        name: &'static str,
        version: i16,
        request: &Req,
        timeout: Duration,
    ) -> Result<Resp>
    where
        Req: Encodable + HeaderVersion,
        Resp: Decodable,
    {
        let answer = self.exchange(key, name, version, request, timeout).await?;
        decode(answer, name, version)
    }

    /// Sends a request and returns its answer's body (after the response header).
    async fn exchange<Req>(
        &mut self,
        key: ApiKey,
        name: &'static str,
        version: i16,
        request: &Req,
        timeout: Duration,
    ) -> Result<Bytes>
    where
        Req: Encodable + HeaderVersion,
    {
        self.correlation = self.correlation.wrapping_add(1);
        let correlation = self.correlation;
        let header = RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(self.client_id.clone()));
        let mut body = BytesMut::new();
        header
            .encode(&mut body, Req::header_version(version))
            .map_err(|e| protocol(name, e))?;
        request
            .encode(&mut body, version)
            .map_err(|e| protocol(name, e))?;
        let mut frame = BytesMut::with_capacity(body.len() + 4);
        frame.put_i32(i32::try_from(body.len()).map_err(|_| protocol(name, "request too large"))?);
        frame.extend_from_slice(&body);
        let exchange = async {
            self.stream.write_all(&frame).await?;
            loop {
                let size = self.stream.read_i32().await?;
                let size = usize::try_from(size)
                    .ok()
                    .filter(|s| *s >= 4 && *s <= MAX_RESPONSE_BYTES)
                    .ok_or_else(|| protocol(name, format!("answer of {size} bytes")))?;
                let mut answer = vec![0; size];
                self.stream.read_exact(&mut answer).await?;
                let mut answer = Bytes::from(answer);
                let header =
                    ResponseHeader::decode(&mut answer, key.response_header_version(version))
                        .map_err(|e| protocol(name, e))?;
                // An answer to an earlier request that timed out: skip it.
                if header.correlation_id != correlation {
                    continue;
                }
                return Ok(answer);
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| CoordinatorError::Timeout {
                request: name,
                timeout,
            })?
    }
}

/// The throttle time and error code that begin a SyncGroup (v1+) or LeaveGroup (v1+) answer.
fn head(answer: &Bytes, request: &'static str) -> Result<(i32, i16)> {
    let mut head = answer.clone();
    if head.remaining() < 6 {
        return Err(protocol(
            request,
            format!("answer of {} bytes", answer.len()),
        ));
    }
    Ok((head.get_i32(), head.get_i16()))
}

fn decode<Resp: Decodable>(mut answer: Bytes, request: &'static str, version: i16) -> Result<Resp> {
    Resp::decode(&mut answer, version).map_err(|e| protocol(request, e))
}

/// An answer or request the codec cannot handle (its errors are anyhow's: kept as text).
fn protocol(request: &'static str, reason: impl std::fmt::Display) -> CoordinatorError {
    CoordinatorError::Protocol {
        request,
        reason: reason.to_string(),
    }
}

fn check(request: &'static str, error_code: i16, message: Option<&StrBytes>) -> Result<()> {
    if error_code == code::NONE {
        return Ok(());
    }
    Err(CoordinatorError::Kafka {
        request,
        code: error_code,
        message: message.map(|m| m.as_str().to_string()),
    })
}

fn millis(duration: Duration) -> i32 {
    i32::try_from(duration.as_millis()).unwrap_or(i32::MAX)
}
