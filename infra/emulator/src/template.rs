//! Reads `infra/template.yaml` the way CloudFormation would for the parts a local run needs:
//! Parameters (defaults, `--parameter-overrides`), Conditions, and the intrinsic functions the
//! template uses (`Ref`, `Fn::GetAtt`, `Fn::Sub`, `Fn::If`, `Fn::Equals`, `Fn::Not`, `Fn::And`,
//! `Fn::Or`, `Fn::Join`, `Fn::Select`), in short (`!Ref`) and long (`{"Ref": ..}`) form.
//!
//! Resources get local physical names: `<stack>-<logical id in kebab case>` (a queue
//! `PullFailureQueue` in stack `pushpull-local` is `pushpull-local-pull-failure-queue`), unless
//! named in [`Template::names`]. `Fn::GetAtt X.Arn` gives the ARN of that name in the local
//! account and region.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde_json::{Map, Value};
use serde_norway::Value as Yaml;

use crate::localstack::{ACCOUNT, REGION};

/// The template could not be read or resolved.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    /// Reading or parsing the file.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A value could not be resolved.
    #[error("template {at}: {reason}")]
    Resolve {
        /// Where in the template.
        at: String,
        /// Why.
        reason: String,
    },
}

fn resolve_err(at: &str, reason: impl Into<String>) -> TemplateError {
    TemplateError::Resolve { at: at.to_owned(), reason: reason.into() }
}

/// A parsed template with its parameters decided.
#[derive(Debug, Clone)]
pub struct Template {
    /// The template's `Resources`, as JSON (short-form tags turned into long form).
    pub resources: Map<String, Value>,
    conditions: Map<String, Value>,
    /// Parameter values: defaults, then overrides.
    pub parameters: BTreeMap<String, String>,
    /// Parameters whose `Ref` is a list (`CommaDelimitedList`, `List<...>`).
    lists: std::collections::BTreeSet<String>,
    /// Physical names of resources by logical id; unnamed ones get `<stack>-<kebab id>`.
    pub names: HashMap<String, String>,
    /// The stack name (`AWS::StackName`).
    pub stack: String,
    /// ARNs known only once their resource exists (a stream consumer's ends in its creation
    /// time), by logical id: set when the stack is provisioned.
    pub arns: HashMap<String, String>,
}

impl Template {
    /// Reads `path`; `overrides` are `Key=Value` as `sam deploy --parameter-overrides` takes them.
    pub fn load(path: &Path, stack: &str, overrides: &[String]) -> Result<Self, TemplateError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| TemplateError::Read { path: path.display().to_string(), reason: e.to_string() })?;
        Self::parse(&text, stack, overrides)
            .map_err(|e| TemplateError::Read { path: path.display().to_string(), reason: e.to_string() })
    }

    /// Parses template text.
    pub fn parse(text: &str, stack: &str, overrides: &[String]) -> Result<Self, TemplateError> {
        let yaml: Yaml = serde_norway::from_str(text)
            .map_err(|e| TemplateError::Read { path: "template".into(), reason: e.to_string() })?;
        let doc = to_json(yaml);
        let section = |name: &str| doc.get(name).and_then(Value::as_object).cloned().unwrap_or_default();
        let mut parameters = BTreeMap::new();
        for (name, p) in section("Parameters") {
            if let Some(d) = p.get("Default") {
                parameters.insert(name.clone(), scalar(d).unwrap_or_default());
            }
        }
        for o in overrides {
            let (k, v) = o
                .split_once('=')
                .ok_or_else(|| resolve_err("parameter overrides", format!("{o:?} is not Key=Value")))?;
            if !section("Parameters").contains_key(k) {
                return Err(resolve_err("parameter overrides", format!("the template has no parameter {k}")));
            }
            parameters.insert(k.to_owned(), v.to_owned());
        }
        let params = section("Parameters");
        for (name, value) in &parameters {
            check_parameter(name, value, &params[name])?;
        }
        let lists = params
            .iter()
            .filter(|(_, p)| p["Type"].as_str().is_some_and(|t| t == "CommaDelimitedList" || t.starts_with("List<")))
            .map(|(name, _)| name.clone())
            .collect();
        let template = Template {
            resources: section("Resources"),
            conditions: section("Conditions"),
            parameters,
            lists,
            names: HashMap::new(),
            stack: stack.to_owned(),
            arns: HashMap::new(),
        };
        template.check_rules(&section("Rules"))?;
        Ok(template)
    }

    /// The template's `Rules`, as CloudFormation checks them before it creates or updates a
    /// stack: each rule whose `RuleCondition` holds (or has none) must have every `Assert` hold,
    /// or the parameters are refused with the assertion's `AssertDescription`. AWS
    /// (CloudFormation User Guide, "CloudFormation template Rules syntax"): rule functions
    /// "validate parameter values before CloudFormation creates or updates any resources"; "A
    /// rule can include a RuleCondition property and must include an Assertions property ... If
    /// you don't define a rule condition, the rule's assertions always take effect."
    fn check_rules(&self, rules: &Map<String, Value>) -> Result<(), TemplateError> {
        for (name, rule) in rules {
            let at = format!("rule {name}");
            if let Some(c) = rule.get("RuleCondition")
                && !self.truth(c, &at)?
            {
                continue;
            }
            let assertions = rule
                .get("Assertions")
                .and_then(Value::as_array)
                .filter(|a| !a.is_empty())
                .ok_or_else(|| resolve_err(&at, "a rule must include Assertions"))?;
            for a in assertions {
                let assert = a.get("Assert").ok_or_else(|| resolve_err(&at, "an assertion without Assert"))?;
                if !self.truth(assert, &at)? {
                    let why = a.get("AssertDescription").and_then(Value::as_str).unwrap_or("an assertion failed");
                    return Err(resolve_err("parameter overrides", format!("{at}: {why}")));
                }
            }
        }
        Ok(())
    }

    /// The local physical name of a resource.
    pub fn name_of(&self, logical: &str) -> String {
        if let Some(name) = self.names.get(logical) {
            return name.clone();
        }
        // A function or queue named in the template is known by that name (`Ref` of it, alarms'
        // and the dashboard's dimensions), as the local host runs it under that name.
        let named = |kind: &str| match kind {
            "AWS::Serverless::Function" | "AWS::Lambda::Function" => Some("/Properties/FunctionName"),
            "AWS::SQS::Queue" => Some("/Properties/QueueName"),
            _ => None,
        };
        if let Some(r) = self.resources.get(logical)
            && let Some(pointer) = r["Type"].as_str().and_then(named)
            && let Some(name) = r.pointer(pointer)
            && let Ok(name) = self.resolve(name, logical)
            && let Some(name) = scalar(&name)
        {
            return name;
        }
        format!("{}-{}", self.stack, kebab(logical))
    }

    /// The ARN of a resource by its type.
    pub fn arn_of(&self, logical: &str) -> Result<String, TemplateError> {
        if let Some(arn) = self.arns.get(logical) {
            return Ok(arn.clone());
        }
        let kind = self.resources.get(logical).and_then(|r| r["Type"].as_str()).unwrap_or("");
        let name = self.name_of(logical);
        Ok(match kind {
            "AWS::Kinesis::Stream" => format!("arn:aws:kinesis:{REGION}:{ACCOUNT}:stream/{name}"),
            "AWS::SQS::Queue" => format!("arn:aws:sqs:{REGION}:{ACCOUNT}:{name}"),
            "AWS::SNS::Topic" => format!("arn:aws:sns:{REGION}:{ACCOUNT}:{name}"),
            "AWS::S3::Bucket" => format!("arn:aws:s3:::{name}"),
            "AWS::IAM::Role" => format!("arn:aws:iam::{ACCOUNT}:role/{name}"),
            "AWS::Logs::LogGroup" => format!("arn:aws:logs:{REGION}:{ACCOUNT}:log-group:{name}"),
            "AWS::Serverless::Function" | "AWS::Lambda::Function" => {
                format!("arn:aws:lambda:{REGION}:{ACCOUNT}:function:{name}")
            }
            other => return Err(resolve_err(logical, format!("no local ARN for a resource of type {other:?}"))),
        })
    }

    /// Evaluates a condition by name.
    pub fn condition(&self, name: &str) -> Result<bool, TemplateError> {
        let c = self.conditions.get(name).ok_or_else(|| resolve_err(name, "no such condition"))?;
        self.truth(c, name)
    }

    fn truth(&self, v: &Value, at: &str) -> Result<bool, TemplateError> {
        if let Some(name) = v.get("Condition").and_then(Value::as_str) {
            return self.condition(name);
        }
        let (f, args) = single(v).ok_or_else(|| resolve_err(at, format!("not a condition: {v}")))?;
        let list = |n: usize| -> Result<Vec<Value>, TemplateError> {
            let a = args.as_array().ok_or_else(|| resolve_err(at, format!("{f} takes a list")))?;
            if n > 0 && a.len() != n {
                return Err(resolve_err(at, format!("{f} takes {n} arguments")));
            }
            Ok(a.clone())
        };
        match f {
            "Fn::Equals" => {
                // CloudFormation compares scalars as text: a Number parameter (a string once
                // given) equals the literal 1 in `!Equals [!Ref Factor, 1]`.
                let a = list(2)?;
                let (x, y) = (self.resolve(&a[0], at)?, self.resolve(&a[1], at)?);
                Ok(match (scalar(&x), scalar(&y)) {
                    (Some(x), Some(y)) => x == y,
                    _ => x == y,
                })
            }
            // A rule function (Rules only): whether the string is one of the list's.
            "Fn::Contains" => {
                let a = list(2)?;
                let (options, x) = (self.resolve(&a[0], at)?, self.resolve(&a[1], at)?);
                let x = scalar(&x);
                Ok(options.as_array().is_some_and(|o| o.iter().any(|v| scalar(v) == x)))
            }
            "Fn::Not" => Ok(!self.truth(&list(1)?[0], at)?),
            "Fn::And" => list(0)?.iter().try_fold(true, |acc, c| Ok(acc && self.truth(c, at)?)),
            "Fn::Or" => list(0)?.iter().try_fold(false, |acc, c| Ok(acc || self.truth(c, at)?)),
            other => Err(resolve_err(at, format!("{other} is not a condition function"))),
        }
    }

    /// Resolves every intrinsic function in `v`; `at` names the place for errors.
    pub fn resolve(&self, v: &Value, at: &str) -> Result<Value, TemplateError> {
        if let Some((f, args)) = single(v).filter(|(f, _)| *f == "Ref" || f.starts_with("Fn::")) {
            return self.intrinsic(f, args, at);
        }
        // `AWS::NoValue` removes the property or list item it stands for, as CloudFormation does.
        let kept = |x: &Value| !is_no_value(x);
        Ok(match v {
            Value::Array(a) => Value::Array(
                a.iter()
                    .map(|x| self.resolve(x, at))
                    .filter(|x| x.as_ref().map_or(true, kept))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(o) => Value::Object(
                o.iter()
                    .map(|(k, x)| Ok((k.clone(), self.resolve(x, &format!("{at}.{k}"))?)))
                    .filter(|kv: &Result<(String, Value), TemplateError>| kv.as_ref().map_or(true, |(_, x)| kept(x)))
                    .collect::<Result<_, _>>()?,
            ),
            other => other.clone(),
        })
    }

    fn reference(&self, name: &str, at: &str) -> Result<String, TemplateError> {
        match name {
            "AWS::Region" => Ok(REGION.to_owned()),
            "AWS::AccountId" => Ok(ACCOUNT.to_owned()),
            "AWS::Partition" => Ok("aws".to_owned()),
            "AWS::StackName" => Ok(self.stack.clone()),
            "AWS::URLSuffix" => Ok("amazonaws.com".to_owned()),
            "AWS::NoValue" => Ok(String::new()),
            _ if self.parameters.contains_key(name) => Ok(self.parameters[name].clone()),
            _ if self.resources.contains_key(name) => {
                // Ref of a queue is its URL in CloudFormation; of a stream, bucket, function: its name.
                let kind = self.resources[name]["Type"].as_str().unwrap_or("");
                let n = self.name_of(name);
                Ok(if kind == "AWS::SQS::Queue" {
                    format!("{}/{ACCOUNT}/{n}", crate::localstack::endpoint())
                } else {
                    n
                })
            }
            _ => Err(resolve_err(at, format!("Ref to unknown {name:?}"))),
        }
    }

    fn get_att(&self, target: &str, at: &str) -> Result<String, TemplateError> {
        let (logical, attr) = target.split_once('.').ok_or_else(|| resolve_err(at, format!("GetAtt {target:?}")))?;
        match attr {
            "Arn" => self.arn_of(logical),
            "QueueName" | "StreamName" => Ok(self.name_of(logical)),
            // A consumer's ARN carries the time it was registered: known once it is.
            "ConsumerARN" => self.arns.get(logical).cloned().ok_or_else(|| {
                resolve_err(
                    at,
                    format!("GetAtt {logical}.ConsumerARN: the consumer is registered when the stack is provisioned"),
                )
            }),
            "ConsumerName" => {
                let name = self.resources.get(logical).and_then(|r| r.pointer("/Properties/ConsumerName")).cloned();
                Ok(name
                    .map(|n| self.resolve(&n, at))
                    .transpose()?
                    .and_then(|v| scalar(&v))
                    .unwrap_or_else(|| self.name_of(logical)))
            }
            other => Err(resolve_err(at, format!("GetAtt {logical}.{other} is not known locally"))),
        }
    }

    fn intrinsic(&self, f: &str, args: &Value, at: &str) -> Result<Value, TemplateError> {
        let arr = || args.as_array().ok_or_else(|| resolve_err(at, format!("{f} takes a list")));
        Ok(match f {
            "Ref" => match args.as_str().unwrap_or_default() {
                "AWS::NoValue" => no_value(),
                name if self.lists.contains(name) => Value::Array(
                    self.parameters[name]
                        .split(',')
                        .map(str::trim)
                        .filter(|s| !s.is_empty())
                        .map(|s| Value::String(s.to_owned()))
                        .collect(),
                ),
                name => Value::String(self.reference(name, at)?),
            },
            "Fn::GetAtt" => {
                let target = match args {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("."),
                    _ => return Err(resolve_err(at, "GetAtt takes a string or a list")),
                };
                Value::String(self.get_att(&target, at)?)
            }
            "Fn::If" => {
                let a = arr()?;
                if a.len() != 3 {
                    return Err(resolve_err(at, "Fn::If takes three arguments"));
                }
                let name = a[0].as_str().ok_or_else(|| resolve_err(at, "Fn::If needs a condition name"))?;
                self.resolve(if self.condition(name)? { &a[1] } else { &a[2] }, at)?
            }
            "Fn::Sub" => {
                let (text, vars) = match args {
                    Value::String(s) => (s.clone(), Map::new()),
                    Value::Array(a) if a.len() == 2 => (
                        a[0].as_str().unwrap_or_default().to_owned(),
                        self.resolve(&a[1], at)?.as_object().cloned().unwrap_or_default(),
                    ),
                    _ => return Err(resolve_err(at, "Fn::Sub takes a string or [string, map]")),
                };
                Value::String(self.substitute(&text, &vars, at)?)
            }
            "Fn::Join" => {
                let a = arr()?;
                let sep = a.first().and_then(Value::as_str).unwrap_or_default();
                let items = self.resolve(a.get(1).unwrap_or(&Value::Null), at)?;
                let parts: Vec<String> =
                    items.as_array().into_iter().flatten().map(|x| scalar(x).unwrap_or_default()).collect();
                Value::String(parts.join(sep))
            }
            "Fn::Select" => {
                let a = arr()?;
                let i: usize = scalar(&self.resolve(&a[0], at)?).and_then(|s| s.parse().ok()).unwrap_or(0);
                let list = self.resolve(a.get(1).unwrap_or(&Value::Null), at)?;
                list.get(i).cloned().ok_or_else(|| resolve_err(at, format!("Fn::Select index {i} out of range")))?
            }
            "Fn::Equals" | "Fn::Not" | "Fn::And" | "Fn::Or" | "Fn::Contains" => {
                Value::Bool(self.truth(&single_obj(f, args), at)?)
            }
            other => return Err(resolve_err(at, format!("{other} is not supported by the local runner"))),
        })
    }

    fn substitute(&self, text: &str, vars: &Map<String, Value>, at: &str) -> Result<String, TemplateError> {
        let mut out = String::new();
        let mut rest = text;
        while let Some(i) = rest.find("${") {
            out.push_str(&rest[..i]);
            let after = &rest[i + 2..];
            if let Some(lit) = after.strip_prefix('!') {
                out.push_str("${");
                rest = lit;
                continue;
            }
            let end = after.find('}').ok_or_else(|| resolve_err(at, format!("unclosed ${{ in {text:?}")))?;
            let name = &after[..end];
            let value = match vars.get(name) {
                Some(v) => scalar(v).unwrap_or_default(),
                None if name.contains('.') && !name.starts_with("AWS::") => self.get_att(name, at)?,
                None => self.reference(name, at)?,
            };
            out.push_str(&value);
            rest = &after[end + 1..];
        }
        out.push_str(rest);
        Ok(out)
    }

    /// The template's serverless functions as a local run needs them: those whose `Condition`
    /// holds.
    pub fn functions(&self) -> Result<Vec<TemplateFunction>, TemplateError> {
        let mut out = Vec::new();
        for (id, r) in self.resources_of("AWS::Serverless::Function") {
            if !self.is_created(id)? {
                continue;
            }
            let props = self.resolve(&r["Properties"], id)?;
            let binary = r
                .pointer("/Metadata/BuildProperties/Binary")
                .and_then(scalar)
                .ok_or_else(|| resolve_err(id, "no Metadata.BuildProperties.Binary: which binary is it?"))?;
            let env = props
                .pointer("/Environment/Variables")
                .and_then(Value::as_object)
                .map(|m| m.iter().map(|(k, v)| (k.clone(), scalar(v).unwrap_or_default())).collect())
                .unwrap_or_default();
            let number = |k: &str, d: u64| props.get(k).and_then(scalar).and_then(|s| s.parse().ok()).unwrap_or(d);
            out.push(TemplateFunction {
                logical_id: id.clone(),
                name: props.get("FunctionName").and_then(scalar).unwrap_or_else(|| self.name_of(id)),
                binary,
                env,
                timeout: std::time::Duration::from_secs(number("Timeout", 3)),
                memory_mb: number("MemorySize", 128) as u32,
                events: r
                    .pointer("/Properties/Events")
                    .and_then(Value::as_object)
                    .map(|m| m.values().filter_map(|e| e["Type"].as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
            });
        }
        Ok(out)
    }

    /// The function an event of type `kind` (SAM's `S3`, `Kinesis`, ...) triggers: how a local
    /// run finds its functions, by what triggers them rather than by their binaries' names.
    pub fn function_with_event(&self, kind: &str) -> Result<TemplateFunction, TemplateError> {
        let mut found = self.functions()?.into_iter().filter(|f| f.events.iter().any(|e| e == kind));
        match (found.next(), found.next()) {
            (Some(f), None) => Ok(f),
            (None, _) => Err(resolve_err("Resources", format!("no function has an event of Type {kind}"))),
            (Some(a), Some(b)) => Err(resolve_err(
                "Resources",
                format!("{} and {} both have an event of Type {kind}: which one?", a.logical_id, b.logical_id),
            )),
        }
    }

    /// Whether a resource is created: its `Condition`, if it has one, holds.
    pub fn is_created(&self, logical: &str) -> Result<bool, TemplateError> {
        match self.resources.get(logical).and_then(|r| r["Condition"].as_str()) {
            Some(c) => self.condition(c),
            None => Ok(true),
        }
    }

    /// Resources of a type that the stack creates (those whose `Condition` is false are left out,
    /// as CloudFormation leaves them out), by logical id.
    pub fn resources_of<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = (&'a String, &'a Value)> + 'a {
        self.resources
            .iter()
            .filter(move |(id, r)| r["Type"].as_str() == Some(kind) && !matches!(self.is_created(id), Ok(false)))
    }
}

/// What `!Ref AWS::NoValue` resolves to: a marker that `resolve` drops from the object or list
/// holding it. (In `Fn::Sub`, `AWS::NoValue` is the empty string.)
fn no_value() -> Value {
    serde_json::json!({ "Ref": "AWS::NoValue" })
}

pub(crate) fn is_no_value(v: &Value) -> bool {
    v.get("Ref").and_then(Value::as_str) == Some("AWS::NoValue")
}

/// A function of the template.
#[derive(Debug, Clone, PartialEq)]
pub struct TemplateFunction {
    /// Logical id.
    pub logical_id: String,
    /// `FunctionName` (resolved), or the local physical name.
    pub name: String,
    /// The cargo binary (`Metadata.BuildProperties.Binary`).
    pub binary: String,
    /// `Environment.Variables`, resolved.
    pub env: Vec<(String, String)>,
    /// `Timeout`.
    pub timeout: std::time::Duration,
    /// `MemorySize`.
    pub memory_mb: u32,
    /// The `Type` of each of its `Events` (`S3`, `Kinesis`, ...).
    pub events: Vec<String>,
}

/// `{"Fn::X": args}` rebuilt (for conditions used as values).
fn single_obj(f: &str, args: &Value) -> Value {
    let mut m = Map::new();
    m.insert(f.to_owned(), args.clone());
    Value::Object(m)
}

/// The only key of a one-key object, and its value.
fn single(v: &Value) -> Option<(&str, &Value)> {
    let o = v.as_object()?;
    if o.len() != 1 {
        return None;
    }
    o.iter().next().map(|(k, v)| (k.as_str(), v))
}

/// A scalar as CloudFormation passes it around: text.
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn kebab(id: &str) -> String {
    let mut out = String::new();
    for (i, c) in id.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('-');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}

fn check_parameter(name: &str, value: &str, spec: &Value) -> Result<(), TemplateError> {
    let at = format!("parameter {name}");
    if let Some(allowed) = spec.get("AllowedValues").and_then(Value::as_array) {
        let ok = allowed.iter().filter_map(scalar).any(|a| a == value);
        if !ok {
            let list: Vec<String> = allowed.iter().filter_map(scalar).collect();
            return Err(resolve_err(&at, format!("{value:?} is not one of {list:?}")));
        }
    }
    if spec.get("Type").and_then(Value::as_str) == Some("Number") {
        let n: f64 = value.parse().map_err(|_| resolve_err(&at, format!("{value:?} is not a number")))?;
        if let Some(min) = spec.get("MinValue").and_then(Value::as_f64).filter(|m| n < *m) {
            return Err(resolve_err(&at, format!("{value} is below MinValue {min}")));
        }
        if let Some(max) = spec.get("MaxValue").and_then(Value::as_f64).filter(|m| n > *m) {
            return Err(resolve_err(&at, format!("{value} is above MaxValue {max}")));
        }
    }
    Ok(())
}

/// YAML to JSON, turning CloudFormation's short-form tags into the long form.
fn to_json(y: Yaml) -> Value {
    match y {
        Yaml::Null => Value::Null,
        Yaml::Bool(b) => Value::Bool(b),
        Yaml::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::from(n.as_f64().unwrap_or_default())
            }
        }
        Yaml::String(s) => Value::String(s),
        Yaml::Sequence(s) => Value::Array(s.into_iter().map(to_json).collect()),
        Yaml::Mapping(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let key = match k {
                        Yaml::String(s) => s,
                        other => scalar(&to_json(other)).unwrap_or_default(),
                    };
                    (key, to_json(v))
                })
                .collect(),
        ),
        Yaml::Tagged(t) => {
            let tag = t.tag.to_string();
            let tag = tag.trim_start_matches('!');
            let name = if tag == "Ref" || tag == "Condition" { tag.to_owned() } else { format!("Fn::{tag}") };
            let mut value = to_json(t.value);
            if name == "Fn::GetAtt"
                && let Value::String(s) = &value
                && let Some((a, b)) = s.split_once('.')
            {
                value = Value::Array(vec![Value::from(a), Value::from(b)]);
            }
            single_obj(&name, &value)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = r#"
Parameters:
  Size: { Type: Number, Default: 100, MinValue: 1, MaxValue: 10000 }
  Name: { Type: String, Default: "" }
  Pos: { Type: String, Default: TRIM_HORIZON, AllowedValues: [TRIM_HORIZON, LATEST] }
Conditions:
  NoName: !Equals [!Ref Name, ""]
  HasName: !Not [!Condition NoName]
Rules:
  SevenNeedsAName:
    RuleCondition: !Equals [!Ref Name, ""]
    Assertions:
      - Assert: !Not [!Equals [!Ref Size, 7]]
        AssertDescription: Size 7 needs a Name
Resources:
  Stream: { Type: AWS::Kinesis::Stream }
  Dlq: { Type: AWS::SQS::Queue }
  Fn:
    Type: AWS::Serverless::Function
    Properties:
      Environment:
        Variables:
          A: !Sub "s3://${AWS::AccountId}/${Name}x"
          B: !If [NoName, !Sub ["pp-${R}", {R: !Ref "AWS::Region"}], !Ref Name]
          C: !GetAtt Dlq.Arn
          D: { "Fn::GetAtt": [Stream, Arn] }
          E: !Join ["-", [a, !Ref Size]]
          F: !Sub "${Stream.Arn}|${!Literal}"
"#;

    fn env(t: &Template) -> Value {
        t.resolve(&t.resources["Fn"]["Properties"]["Environment"]["Variables"], "env").unwrap()
    }

    #[test]
    fn resolves_defaults_conditions_and_intrinsics() {
        let t = Template::parse(T, "st", &[]).unwrap();
        let e = env(&t);
        assert_eq!(e["A"], "s3://000000000000/x");
        assert_eq!(e["B"], "pp-us-east-1");
        assert_eq!(e["C"], "arn:aws:sqs:us-east-1:000000000000:st-dlq");
        assert_eq!(e["D"], "arn:aws:kinesis:us-east-1:000000000000:stream/st-stream");
        assert_eq!(e["E"], "a-100");
        assert_eq!(e["F"], "arn:aws:kinesis:us-east-1:000000000000:stream/st-stream|${Literal}");
        assert!(!t.condition("HasName").unwrap());
    }

    #[test]
    fn overrides_are_checked_like_cloudformation_checks_them() {
        let t = Template::parse(T, "st", &["Name=given".into(), "Size=7".into()]).unwrap();
        assert_eq!(env(&t)["B"], "given");
        assert_eq!(env(&t)["E"], "a-7");
        let e = Template::parse(T, "st", &["Size=0".into()]).unwrap_err().to_string();
        assert!(e.contains("below MinValue 1"), "{e}");
        let e = Template::parse(T, "st", &["Pos=AT_TIMESTAMP".into()]).unwrap_err().to_string();
        assert!(e.contains("is not one of"), "{e}");
        let e = Template::parse(T, "st", &["Nope=1".into()]).unwrap_err().to_string();
        assert!(e.contains("no parameter Nope"), "{e}");
        // Rules (CloudFormation's "Rules" section): checked when their RuleCondition holds.
        let e = Template::parse(T, "st", &["Size=7".into()]).unwrap_err().to_string();
        assert!(e.contains("rule SevenNeedsAName: Size 7 needs a Name"), "{e}");
        let bare = format!("{T}\nRules:\n  Empty: {{ RuleCondition: !Equals [!Ref Name, \"\"] }}\n");
        let e = Template::parse(&bare.replace("Rules:\n  SevenNeedsAName", "Unused:\n  SevenNeedsAName"), "st", &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("must include Assertions"), "{e}");
    }

    #[test]
    fn reads_the_projects_template() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let t = Template::load(&path, "pushpull-local", &[]).unwrap();
        let f = &t.resources["KinesisRollupFunction"]["Properties"];
        let env = t.resolve(&f["Environment"]["Variables"], "env").unwrap();
        assert_eq!(env["CHECKPOINT_URI"], "s3://pushpull-000000000000-us-east-1/checkpoints/pull");
        let fs = t.functions().unwrap();
        let pull = fs.iter().find(|f| f.binary == "kinesis-rollup").unwrap();
        assert_eq!(t.function_with_event("Kinesis").unwrap().binary, "kinesis-rollup");
        assert_eq!(t.function_with_event("S3").unwrap().binary, "s3-to-kinesis");
        assert!(t.function_with_event("SQS").is_err());
        assert_eq!(pull.name, "pushpull-local-kinesis-rollup");
        assert_eq!(pull.timeout, std::time::Duration::from_secs(60));
        assert!(pull.env.contains(&("SUM_FIELD".to_owned(), "amount".to_owned())));
        // One position per shard at ParallelizationFactor 1, one per partition key above it.
        let positions = |overrides: &[&str]| {
            let overrides: Vec<String> = overrides.iter().map(|o| (*o).to_owned()).collect();
            let t = Template::load(&path, "pushpull-local", &overrides)?;
            let fs = t.functions()?;
            let pull = fs.into_iter().find(|f| f.binary == "kinesis-rollup").unwrap();
            Ok::<_, TemplateError>(pull.env.into_iter().find(|(k, _)| k == "ROLLUP_POSITIONS").unwrap().1)
        };
        assert_eq!(positions(&[]).unwrap(), "per-shard");
        assert_eq!(positions(&["ParallelizationFactor=10"]).unwrap(), "per-key");
        assert!(positions(&["ParallelizationFactor=11"]).unwrap_err().to_string().contains("above MaxValue 10"));
        let e = positions(&["ParallelizationFactor=2", "TumblingWindowInSeconds=60"]).unwrap_err().to_string();
        assert!(e.contains("rule WindowsNeedOneBatchPerShard"), "{e}");
    }

    #[test]
    fn the_kafka_variant_replaces_the_stream_with_a_topic() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let env_of = |t: &Template, binary: &str| -> BTreeMap<String, String> {
            t.functions().unwrap().into_iter().find(|f| f.binary == binary).unwrap().env.into_iter().collect()
        };
        // Kinesis (the default): the stream, and no Kafka settings in the push function's
        // environment (`AWS::NoValue` removes them, as CloudFormation does).
        let t = Template::load(&path, "st", &[]).unwrap();
        assert!(t.is_created("RecordStream").unwrap() && !t.is_created("KafkaRollupFunction").unwrap());
        let push = env_of(&t, "s3-to-kinesis");
        assert_eq!(push.get("STREAM_NAME").map(String::as_str), Some("st-record-stream"));
        assert!(!push.contains_key("KAFKA_TOPIC") && !push.contains_key("KAFKA_BOOTSTRAP_SERVERS"), "{push:?}");
        assert_eq!(t.function_with_event("Kinesis").unwrap().logical_id, "KinesisRollupFunction");
        // Kafka: no stream, one rollup (the same binary and name) with a SelfManagedKafka event,
        // and the push function writing to the topic on the servers given (a list parameter).
        let overrides = ["Broker=kafka".into(), "KafkaBootstrapServers=127.0.0.1:9092, 127.0.0.1:9093".into()];
        let t = Template::load(&path, "st", &overrides).unwrap();
        assert!(!t.is_created("RecordStream").unwrap() && t.resources_of("AWS::Kinesis::Stream").next().is_none());
        assert!(t.function_with_event("Kinesis").is_err());
        let pull = t.function_with_event("SelfManagedKafka").unwrap();
        assert_eq!((pull.logical_id.as_str(), pull.name.as_str()), ("KafkaRollupFunction", "st-kinesis-rollup"));
        let push = env_of(&t, "s3-to-kinesis");
        assert!(!push.contains_key("STREAM_NAME"), "{push:?}");
        assert_eq!(push["KAFKA_TOPIC"], "st-records");
        assert_eq!(push["KAFKA_BOOTSTRAP_SERVERS"], "127.0.0.1:9092,127.0.0.1:9093");
        // The rollup's role loses the stream's statements rather than naming a stream that is
        // not created; the VPC statements come only with a subnet and a security group.
        let role = t.resolve(&t.resources["PullRole"]["Properties"]["Policies"], "PullRole").unwrap();
        let sids: Vec<&str> = role[0]["PolicyDocument"]["Statement"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|s| s["Sid"].as_str())
            .collect();
        assert_eq!(sids, ["Logs", "OutputsAndCheckpoints", "MissingKeysAnswer404", "FailureDestination"]);
        let mut in_vpc = overrides.to_vec();
        in_vpc.extend(["KafkaSubnetId=subnet-0abc".to_owned(), "KafkaSecurityGroupId=sg-0abc".to_owned()]);
        let t = Template::load(&path, "st", &in_vpc).unwrap();
        let role = t.resolve(&t.resources["PullRole"]["Properties"]["Policies"], "PullRole").unwrap();
        assert!(role.to_string().contains("KafkaMappingNetwork"));
        // Kafka mappings have no ParallelizationFactor or tumbling window (a rule says so).
        let mut factor = overrides.to_vec();
        factor.push("ParallelizationFactor=2".into());
        let e = Template::load(&path, "st", &factor).unwrap_err().to_string();
        assert!(e.contains("rule KafkaHasNoStreamSettings"), "{e}");
        let mut half = overrides.to_vec();
        half.push("KafkaSubnetId=subnet-0abc".into());
        let e = Template::load(&path, "st", &half).unwrap_err().to_string();
        assert!(e.contains("given together"), "{e}");
    }

    #[test]
    fn a_stream_consumer_exists_by_its_condition_and_has_its_arn_once_registered() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../template.yaml");
        let events = |t: &Template| {
            let f = &t.resources["KinesisRollupFunction"]["Properties"]["Events"]["Records"]["Properties"];
            t.resolve(&f["Stream"], "Stream")
        };
        // Polling (the default): no consumer; the mapping reads the stream.
        let t = Template::load(&path, "st", &[]).unwrap();
        assert!(!t.is_created("RollupConsumer").unwrap());
        assert_eq!(events(&t).unwrap(), "arn:aws:kinesis:us-east-1:000000000000:stream/st-record-stream");
        // Enhanced fan-out: the consumer exists; its ARN (which carries its creation time) is
        // known once it is registered, and is then the mapping's source.
        let mut t = Template::load(&path, "st", &["ReadMode=enhanced-fan-out".into()]).unwrap();
        assert!(t.is_created("RollupConsumer").unwrap());
        let e = events(&t).unwrap_err().to_string();
        assert!(e.contains("registered when the stack is provisioned"), "{e}");
        let arn = "arn:aws:kinesis:us-east-1:000000000000:stream/st-record-stream/consumer/st-rollup:1795696200";
        t.arns.insert("RollupConsumer".into(), arn.into());
        assert_eq!(events(&t).unwrap(), arn);
        assert_eq!(t.get_att("RollupConsumer.ConsumerName", "x").unwrap(), "st-rollup");
    }
}
