//! The template's IAM roles, enforced locally: LocalStack's free edition checks no IAM, so
//! nothing would notice a role that lacks a permission its function needs until it is deployed.
//!
//! Each function whose `Role` is a role of the template signs its calls with an access key of
//! its own ([`access_key`]); the proxy reads the key from the request's `Authorization` header,
//! works out the action and resource the call needs ([`kinesis_call`], [`s3_call`],
//! [`sqs_call`]) and evaluates the role's inline policy statements: an explicit `Deny` wins, then
//! an `Allow` whose `Action` and `Resource` patterns match (`*` and `?` as IAM reads them), else
//! the call is denied, answered as AWS answers it (`AccessDeniedException` for Kinesis and SQS,
//! `403 AccessDenied` for S3). Calls signed with any other key (the tests, the AWS CLI, the local
//! mapping's own bookkeeping) are not checked.
//!
//! What is not modelled: policy conditions, `NotAction` / `NotResource`, managed policies and
//! SAM policy templates, resource policies (bucket and queue policies).
use std::collections::HashMap;

use serde_json::Value;

use crate::localstack::{ACCOUNT, REGION};
use crate::template::{Template, TemplateError, scalar};

/// One statement of a role's policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// `Effect: Allow` (else Deny).
    pub allow: bool,
    /// `Action` patterns.
    pub actions: Vec<String>,
    /// `Resource` patterns.
    pub resources: Vec<String>,
}

/// A role of the template.
#[derive(Debug, Clone, PartialEq)]
pub struct Role {
    /// Its logical id.
    pub logical_id: String,
    /// Its name (`<stack>-<logical-id>` locally).
    pub name: String,
    /// The session name in denials (the function's name).
    pub session: String,
    /// Its statements, from every inline policy.
    pub statements: Vec<Statement>,
}

/// What a call needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// `service:Action`.
    pub action: String,
    /// The resource's ARN.
    pub resource: String,
}

/// The verdict on a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Not signed by a role's key: not checked.
    Unchecked,
    /// The role allows it.
    Allowed,
    /// The role does not allow it (AWS's message).
    Denied(String),
}

/// The access key a function with role `logical_id` signs with.
pub fn access_key(logical_id: &str) -> String {
    format!("PPLOCALROLE{logical_id}")
}

/// The roles of a template by the access key their functions sign with.
#[derive(Debug, Clone, Default)]
pub struct Policies {
    roles: HashMap<String, Role>,
    functions: HashMap<String, String>,
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a.iter().filter_map(scalar).collect(),
        other => scalar(other).into_iter().collect(),
    }
}

/// The logical id a `Role: !GetAtt X.Arn` (or `!Ref X`) names.
fn role_ref(v: &Value) -> Option<String> {
    if let Some(a) = v.get("Fn::GetAtt").and_then(Value::as_array) {
        return a.first().and_then(Value::as_str).map(str::to_owned);
    }
    v.get("Ref").and_then(Value::as_str).map(str::to_owned)
}

impl Policies {
    /// The roles of `t` and which function uses which. A statement whose resource the local
    /// world cannot name (a log group's, say) is skipped with a warning.
    pub fn from_template(t: &Template) -> Result<Self, TemplateError> {
        let mut functions = HashMap::new();
        let mut sessions = HashMap::new();
        for kind in ["AWS::Serverless::Function", "AWS::Lambda::Function"] {
            for (id, r) in t.resources_of(kind) {
                if let Some(role) = role_ref(&r["Properties"]["Role"]) {
                    let name = match r["Properties"].get("FunctionName") {
                        Some(n) => scalar(&t.resolve(n, id)?).unwrap_or_else(|| t.name_of(id)),
                        None => t.name_of(id),
                    };
                    sessions.insert(role.clone(), name.clone());
                    functions.insert(name, role);
                }
            }
        }
        let mut roles = HashMap::new();
        for (id, r) in t.resources_of("AWS::IAM::Role") {
            let mut statements = Vec::new();
            for (i, policy) in r["Properties"]["Policies"].as_array().into_iter().flatten().enumerate() {
                let doc = &policy["PolicyDocument"]["Statement"];
                let list = match doc {
                    Value::Array(a) => a.clone(),
                    other => vec![other.clone()],
                };
                for (j, s) in list.iter().enumerate() {
                    let at = format!("{id}.Policies[{i}].Statement[{j}]");
                    let resolved = match t.resolve(s, &at) {
                        // A statement behind a false condition (`!If [C, {...}, !Ref AWS::NoValue]`)
                        // is not in the policy.
                        Ok(v) if crate::template::is_no_value(&v) => continue,
                        Ok(v) => v,
                        Err(e) => {
                            tracing::warn!(statement = %at, error = %e, "IAM statement not enforced locally");
                            continue;
                        }
                    };
                    statements.push(Statement {
                        allow: resolved["Effect"].as_str() == Some("Allow"),
                        actions: strings(&resolved["Action"]),
                        resources: strings(&resolved["Resource"]),
                    });
                }
            }
            let session = sessions.get(id).cloned().unwrap_or_else(|| "session".to_owned());
            roles.insert(access_key(id), Role { logical_id: id.clone(), name: t.name_of(id), session, statements });
        }
        Ok(Policies { roles, functions })
    }

    /// The access key the function named `function` signs with, if its role is the template's.
    pub fn key_of_function(&self, function: &str) -> Option<String> {
        self.functions.get(function).map(|r| access_key(r))
    }

    /// The role of a logical id.
    pub fn role(&self, logical_id: &str) -> Option<&Role> {
        self.roles.get(&access_key(logical_id))
    }

    /// Whether `key` is a role's (a function's), not an unchecked caller's.
    pub fn is_role(&self, key: &str) -> bool {
        self.roles.contains_key(key)
    }

    /// Whether the holder of `key` may make `call`.
    pub fn check(&self, key: &str, call: &Call) -> Decision {
        let Some(role) = self.roles.get(key) else { return Decision::Unchecked };
        let matching = |s: &&Statement| {
            s.actions.iter().any(|a| glob(&a.to_ascii_lowercase(), &call.action.to_ascii_lowercase()))
                && s.resources.iter().any(|r| glob(r, &call.resource))
        };
        let denied = role.statements.iter().filter(|s| !s.allow).any(|s| matching(&s));
        if !denied && role.statements.iter().filter(|s| s.allow).any(|s| matching(&s)) {
            return Decision::Allowed;
        }
        let why = if denied {
            "with an explicit deny in an identity-based policy".to_owned()
        } else {
            format!("because no identity-based policy allows the {} action", call.action)
        };
        Decision::Denied(format!(
            "User: arn:aws:sts::{ACCOUNT}:assumed-role/{}/{} is not authorized to perform: {} on resource: {} {why}",
            role.name, role.session, call.action, call.resource
        ))
    }
}

/// IAM's wildcard match: `*` any run of characters, `?` any one.
pub fn glob(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti, mut star, mut mark) = (0, 0, None, 0);
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ti;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ti = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// The access key id of a SigV4 `Authorization` header.
pub fn access_key_of(authorization: &str) -> Option<&str> {
    let rest = &authorization[authorization.find("Credential=")? + "Credential=".len()..];
    rest.split('/').next()
}

/// The ARN of a Kinesis stream named `name` (or the ARN itself).
pub fn stream_arn(name_or_arn: &str) -> String {
    if name_or_arn.starts_with("arn:") {
        name_or_arn.to_owned()
    } else {
        format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{name_or_arn}")
    }
}

/// What a Kinesis call (`X-Amz-Target: Kinesis_20131202.<op>`) needs. `stream` is the stream
/// the call is about when the body does not say (GetRecords: the iterator's).
///
/// A call that names no stream (ListShards' later pages carry only a `NextToken`; ListStreams)
/// is checked against `arn:aws:kinesis:<region>:<account>:*` only when `op` lists streams;
/// otherwise (`None`) it is not checked: the stream it is about is in a token we cannot read.
pub fn kinesis_call(op: &str, body: &Value, stream: Option<&str>) -> Option<Call> {
    if let Some(consumer) = body["ConsumerARN"].as_str() {
        // SubscribeToShard, DescribeStreamConsumer: on the consumer.
        return Some(Call { action: format!("kinesis:{op}"), resource: consumer.to_owned() });
    }
    let named = body["StreamARN"].as_str().or(body["StreamName"].as_str()).or(stream);
    let resource = match named {
        Some(s) => stream_arn(s),
        None if op == "ListStreams" => format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:*"),
        None => return None,
    };
    Some(Call { action: format!("kinesis:{op}"), resource })
}

/// What an S3 call (path-style: `/<bucket>/<key>`) needs.
pub fn s3_call(method: &str, path: &str, query: &str, copy_source: bool) -> Call {
    let path = path.trim_start_matches('/');
    let (bucket, key) = path.split_once('/').unwrap_or((path, ""));
    let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
    let has = |q: &str| query.split('&').any(|p| p == q || p.starts_with(&format!("{q}=")));
    let object = format!("arn:aws:s3:::{bucket}/{key}");
    let bucket_arn = format!("arn:aws:s3:::{bucket}");
    let (action, resource) = match (method, key.is_empty()) {
        ("GET" | "HEAD", false) if has("versionId") => ("s3:GetObjectVersion", object),
        ("GET" | "HEAD", false) if !has("uploadId") && !has("tagging") && !has("acl") => ("s3:GetObject", object),
        ("PUT", false) if !copy_source && !has("tagging") && !has("acl") => ("s3:PutObject", object),
        ("PUT", false) if copy_source => ("s3:PutObject", object),
        ("POST", false) => ("s3:PutObject", object),
        ("DELETE", false) => ("s3:DeleteObject", object),
        ("GET", true) if query.is_empty() || has("list-type") || has("prefix") => ("s3:ListBucket", bucket_arn),
        ("HEAD", true) => ("s3:ListBucket", bucket_arn),
        _ => ("s3:Other", if key.is_empty() { bucket_arn } else { object }),
    };
    Call { action: action.to_owned(), resource }
}

/// What an SQS call needs: `op` from `X-Amz-Target: AmazonSQS.<op>`, the queue from `QueueUrl`.
pub fn sqs_call(op: &str, body: &Value) -> Call {
    // GetQueueUrl names its queue by name; the rest by URL.
    let name = body["QueueUrl"].as_str().and_then(|u| u.trim_end_matches('/').rsplit('/').next());
    let resource = match name.or_else(|| body["QueueName"].as_str()) {
        Some(name) => format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"),
        None => format!("arn:aws:sqs:{REGION}:{ACCOUNT}:*"),
    };
    // A batch action is allowed by its single action's permission (SQS API permissions reference:
    // SendMessageBatch, DeleteMessageBatch and ChangeMessageVisibilityBatch need sqs:SendMessage,
    // sqs:DeleteMessage and sqs:ChangeMessageVisibility).
    let action = op.strip_suffix("Batch").filter(|a| a.ends_with("Message") || a.ends_with("Visibility")).unwrap_or(op);
    Call { action: format!("sqs:{action}"), resource }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = include_str!("../../../template.yaml");

    fn policies() -> Policies {
        let t = Template::parse(TEMPLATE, "pp", &["DataBucketName=data".into()]).unwrap();
        Policies::from_template(&t).unwrap()
    }

    #[test]
    fn globs_match_as_iam_does() {
        assert!(glob("arn:aws:s3:::b/input/*", "arn:aws:s3:::b/input/a/b.ndjson"));
        assert!(!glob("arn:aws:s3:::b/input/*", "arn:aws:s3:::b/output/x"));
        assert!(glob("kinesis:get*", "kinesis:getrecords"));
        assert!(glob("a?c", "abc") && !glob("a?c", "abbc"));
        assert!(glob("*", "") && glob("", "") && !glob("", "x"));
    }

    #[test]
    fn the_keys_of_a_signature_are_read() {
        let h = "AWS4-HMAC-SHA256 Credential=PPLOCALROLEPushRole/20261126/us-east-1/kinesis/aws4_request, SignedHeaders=host, Signature=00";
        assert_eq!(access_key_of(h), Some("PPLOCALROLEPushRole"));
        assert_eq!(access_key_of("Bearer x"), None);
    }

    #[test]
    fn the_template_roles_allow_what_their_functions_need_and_nothing_else() {
        let p = policies();
        let push = access_key("PushRole");
        let pull = access_key("PullRole");
        assert_eq!(p.key_of_function("pp-s3-to-kinesis"), Some(push.clone()));
        let stream = stream_arn("pp-record-stream");
        let call = |a: &str, r: &str| Call { action: a.into(), resource: r.into() };
        assert_eq!(p.check(&push, &call("kinesis:PutRecords", &stream)), Decision::Allowed);
        assert_eq!(p.check(&push, &s3_call("GET", "/data/input/a.ndjson", "", false)), Decision::Allowed);
        assert_eq!(p.check(&push, &s3_call("PUT", "/data/checkpoints/push/x", "", false)), Decision::Allowed);
        assert_eq!(p.check(&push, &s3_call("GET", "/data", "list-type=2&prefix=input", false)), Decision::Allowed);
        // The push role may not write outputs, nor read other prefixes.
        let Decision::Denied(msg) = p.check(&push, &s3_call("PUT", "/data/output/x", "", false)) else { panic!() };
        assert_eq!(
            msg,
            "User: arn:aws:sts::000000000000:assumed-role/pp-push-role/pp-s3-to-kinesis is not authorized to perform: s3:PutObject on resource: arn:aws:s3:::data/output/x because no identity-based policy allows the s3:PutObject action"
        );
        assert!(matches!(p.check(&push, &call("kinesis:DeleteStream", &stream)), Decision::Denied(_)));
        assert!(matches!(p.check(&push, &call("kinesis:PutRecords", &stream_arn("other"))), Decision::Denied(_)));
        // The pull role reads the stream (the mapping uses it) and writes outputs.
        assert_eq!(p.check(&pull, &call("kinesis:GetRecords", &stream)), Decision::Allowed);
        assert_eq!(p.check(&pull, &s3_call("PUT", "/data/output/s/x", "", false)), Decision::Allowed);
        assert!(matches!(p.check(&pull, &call("kinesis:PutRecords", &stream)), Decision::Denied(_)));
        assert_eq!(p.check("test", &call("kinesis:DeleteStream", &stream)), Decision::Unchecked);
        let q = serde_json::json!({"QueueUrl": "http://127.0.0.1:4566/000000000000/pp-pull-failure-queue"});
        assert_eq!(p.check(&pull, &sqs_call("SendMessage", &q)), Decision::Allowed);
        assert!(matches!(p.check(&push, &sqs_call("SendMessage", &q)), Decision::Denied(_)));
    }

    /// The SQS variant: the push role sends to the record queue (SendMessageBatch is allowed by
    /// sqs:SendMessage), the pull role receives and deletes (DeleteMessageBatch by
    /// sqs:DeleteMessage); neither does the other's part.
    #[test]
    fn the_sqs_variants_roles_send_and_receive_their_queue() {
        let t = Template::parse(TEMPLATE, "pp", &["DataBucketName=data".into(), "Broker=sqs".into()]).unwrap();
        let p = Policies::from_template(&t).unwrap();
        let (push, pull) = (access_key("PushRole"), access_key("PullRole"));
        let q = serde_json::json!({"QueueUrl": "http://127.0.0.1:4566/000000000000/pp-records"});
        let by_name = serde_json::json!({"QueueName": "pp-records"});
        assert_eq!(p.check(&push, &sqs_call("SendMessageBatch", &q)), Decision::Allowed);
        assert_eq!(p.check(&push, &sqs_call("GetQueueUrl", &by_name)), Decision::Allowed);
        assert!(matches!(p.check(&push, &sqs_call("ReceiveMessage", &q)), Decision::Denied(_)));
        for op in ["ReceiveMessage", "DeleteMessageBatch", "DeleteMessage", "GetQueueAttributes"] {
            assert_eq!(p.check(&pull, &sqs_call(op, &q)), Decision::Allowed, "{op}");
        }
        assert!(matches!(p.check(&pull, &sqs_call("SendMessageBatch", &q)), Decision::Denied(_)));
        assert_eq!(sqs_call("ChangeMessageVisibilityBatch", &q).action, "sqs:ChangeMessageVisibility");
    }

    #[test]
    fn s3_calls_name_their_action_and_resource() {
        let c = s3_call("GET", "/b/in/a%20b.ndjson", "versionId=3", false);
        assert_eq!((c.action.as_str(), c.resource.as_str()), ("s3:GetObjectVersion", "arn:aws:s3:::b/in/a b.ndjson"));
        assert_eq!(s3_call("HEAD", "/b/k", "", false).action, "s3:GetObject");
        assert_eq!(s3_call("GET", "/b", "list-type=2", false).resource, "arn:aws:s3:::b");
        assert_eq!(s3_call("PUT", "/b", "notification", false).action, "s3:Other");
    }
}
