//! Event filtering (`FilterCriteria`): which records the mapping hands to the function.
//!
//! AWS, "Control which events Lambda sends to your function"
//! (docs.aws.amazon.com/lambda/latest/dg/invocation-eventfiltering.html): "By default, you can
//! define up to five different filters for a single event source mapping. Your filters are
//! logically ORed together. If a record from your event source satisfies one or more of your
//! filters, Lambda includes the record in the next event it sends to your function. If none of
//! your filters are satisfied, Lambda discards the record." and "For filter rules, Lambda supports
//! the same set of syntax and rules as Amazon EventBridge". The operators here are EventBridge's:
//! exact values (strings, numbers, `true`/`false`, `null`, `""`), `prefix`, `suffix`,
//! `equals-ignore-case`, `wildcard`, `anything-but` (values, or a `prefix` / `suffix` /
//! `equals-ignore-case` inside it), `numeric` (`=`, `<`, `<=`, `>`, `>=`, up to two of them),
//! `exists`, `$or`, nested objects, and arrays in the record (a rule matches an array if it
//! matches one of its elements). "For strings, Lambda uses exact character-by-character matching
//! without case-folding or any other string normalization. For numbers, Lambda also uses string
//! representation. For example, 300, 300.0, and 3.0e2 are not considered equal." (exact values;
//! `numeric` compares numbers).
//!
//! Kinesis (…/with-kinesis-filtering.html): "Kinesis event source mappings only support filtering
//! on the `data` key", the record's data decoded from base64 and read as JSON. The streams rule
//! ("Properly filtering Kinesis and DynamoDB messages"): data that is not valid JSON with a
//! pattern for data properties: "Lambda drops the record"; with no pattern for data properties,
//! the record is filtered on the other keys only. Which other keys (what AWS calls metadata
//! properties) a record has is its source's ([`super::source::Partition::filter_fields`]): a
//! Kinesis record has none, so a pattern that names `partitionKey` (as AWS's older documentation
//! showed) matches no Kinesis record, as on AWS today. AWS does not say whether it refuses such a
//! pattern; we accept it, as the API's shape does, and the mapping warns at its start
//! ([`FilterCriteria::metadata_keys`]).
//! Records filtered out are not invoked, are checkpointed past ("Once your filter criteria
//! processes an Kinesis or DynamoDB record, the streams iterator advances past this record") and
//! counted (`FilteredOutEventCount`).
use serde_json::{Map, Value};

/// AWS's default quota of filters per mapping ("up to five"; 10 with a quota increase).
pub const MAX_FILTERS: usize = 5;
/// The API's limit on one `Pattern` (`Filter.Pattern`: "Maximum length of 4096").
pub const MAX_PATTERN_CHARS: usize = 4096;

/// Why a `FilterCriteria` is refused, in AWS's words where AWS has them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("InvalidParameterValueException: {0}")]
pub struct InvalidFilter(pub String);

/// A mapping's filters: a record passes if one of them matches (no filters: every record).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterCriteria {
    patterns: Vec<Pattern>,
}

/// One compiled pattern.
#[derive(Debug, Clone, PartialEq)]
struct Pattern {
    /// The pattern's rules for the data (`data`), if any.
    data: Option<Node>,
    /// Rules for the record's other fields.
    metadata: Node,
}

/// An object level of a pattern: fields and their rules, and `$or` alternatives.
#[derive(Debug, Clone, PartialEq, Default)]
struct Node {
    fields: Vec<(String, Rule)>,
    any_of: Vec<Vec<Node>>,
}

#[derive(Debug, Clone, PartialEq)]
enum Rule {
    /// A nested object.
    Nested(Node),
    /// A leaf: the field matches if one matcher does.
    Leaf(Vec<Matcher>),
}

#[derive(Debug, Clone, PartialEq)]
enum Matcher {
    /// An exact value (strings, numbers by their text, booleans, null).
    Exact(Value),
    Prefix(String),
    Suffix(String),
    EqualsIgnoreCase(String),
    Wildcard(String),
    AnythingBut(Vec<Value>),
    AnythingButPrefix(String),
    AnythingButSuffix(String),
    AnythingButIgnoreCase(Vec<String>),
    Numeric(Vec<(String, f64)>),
    Exists(bool),
}

impl FilterCriteria {
    /// No filters: every record passes.
    pub fn none() -> Self {
        FilterCriteria::default()
    }

    /// Whether there are filters.
    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// Parses `FilterCriteria` as the API, the CLI's `--filter-criteria` and the template take
    /// it: `{"Filters": [{"Pattern": "<JSON text>"}]}`; `{}` means none.
    pub fn parse(criteria: &Value) -> Result<Self, InvalidFilter> {
        let filters = match criteria.get("Filters") {
            None | Some(Value::Null) => return Ok(Self::none()),
            Some(Value::Array(f)) => f,
            Some(other) => return Err(InvalidFilter(format!("FilterCriteria.Filters must be a list, not {other}"))),
        };
        if filters.len() > MAX_FILTERS {
            return Err(InvalidFilter(format!(
                "The number of filters ({}) exceeds the limit of {MAX_FILTERS} filters per event source mapping",
                filters.len()
            )));
        }
        let mut patterns = Vec::new();
        for (i, f) in filters.iter().enumerate() {
            let text = f.get("Pattern").and_then(Value::as_str).unwrap_or("");
            if text.chars().count() > MAX_PATTERN_CHARS {
                return Err(InvalidFilter(format!(
                    "1 validation error detected: Value at 'filterCriteria.filters.{}.member.pattern' failed to satisfy constraint: Member must have length less than or equal to {MAX_PATTERN_CHARS}",
                    i + 1
                )));
            }
            patterns.push(Pattern::parse(text)?);
        }
        Ok(FilterCriteria { patterns })
    }

    /// The top-level keys other than `data` that the patterns name (inside `$or` too): the
    /// metadata properties a source must supply for them to match.
    pub fn metadata_keys(&self) -> Vec<&str> {
        fn keys<'a>(node: &'a Node, out: &mut Vec<&'a str>) {
            out.extend(node.fields.iter().map(|(k, _)| k.as_str()));
            for alt in node.any_of.iter().flatten() {
                keys(alt, out);
            }
        }
        let mut out = Vec::new();
        for p in &self.patterns {
            keys(&p.metadata, &mut out);
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Whether a record passes: `data` is the record's decoded data, `metadata` the other
    /// properties its source supplies (none for Kinesis).
    pub fn passes(&self, data: &[u8], metadata: &Map<String, Value>) -> bool {
        if self.patterns.is_empty() {
            return true;
        }
        // Decoded once, only if a pattern asks about the data.
        let mut decoded: Option<Option<Value>> = None;
        self.patterns.iter().any(|p| {
            if !p.metadata.matches(metadata) {
                return false;
            }
            match &p.data {
                None => true,
                Some(rules) => {
                    let json = decoded.get_or_insert_with(|| serde_json::from_slice::<Value>(data).ok());
                    // Data that is not JSON (or JSON that is not an object) is dropped by a
                    // pattern on data properties.
                    match json {
                        Some(Value::Object(obj)) => rules.matches(obj),
                        _ => false,
                    }
                }
            }
        })
    }
}

impl Pattern {
    fn parse(text: &str) -> Result<Self, InvalidFilter> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| InvalidFilter(format!("Invalid filter pattern definition: {e} in {text:?}")))?;
        let Value::Object(mut obj) = value else {
            return Err(InvalidFilter(format!("Invalid filter pattern definition: {text:?} is not a JSON object")));
        };
        let data = match obj.remove("data") {
            None => None,
            Some(Value::Object(d)) => Some(Node::parse(&d)?),
            Some(_) => {
                // AWS: a data pattern that is not JSON "throws an exception at the time of the
                // event source mapping creation or update".
                return Err(InvalidFilter(
                    "The filter pattern for data properties must be in a valid JSON format".into(),
                ));
            }
        };
        Ok(Pattern { data, metadata: Node::parse(&obj)? })
    }
}

impl Node {
    fn parse(obj: &Map<String, Value>) -> Result<Self, InvalidFilter> {
        let mut node = Node::default();
        for (key, v) in obj {
            if key == "$or" {
                let Some(alternatives) = v.as_array().filter(|a| a.len() >= 2) else {
                    return Err(InvalidFilter("$or takes a list of at least two patterns".into()));
                };
                let mut any = Vec::new();
                for alt in alternatives {
                    let Value::Object(o) = alt else {
                        return Err(InvalidFilter(format!("$or: {alt} is not a pattern object")));
                    };
                    any.push(Node::parse(o)?);
                }
                node.any_of.push(any);
                continue;
            }
            let rule = match v {
                Value::Object(o) => Rule::Nested(Node::parse(o)?),
                Value::Array(items) => {
                    if items.is_empty() {
                        return Err(InvalidFilter(format!("Invalid filter pattern: empty list for {key:?}")));
                    }
                    Rule::Leaf(items.iter().map(|i| Matcher::parse(key, i)).collect::<Result<_, _>>()?)
                }
                other => {
                    return Err(InvalidFilter(format!(
                        "Invalid filter pattern: the value of {key:?} must be a list or an object, not {other}"
                    )));
                }
            };
            node.fields.push((key.clone(), rule));
        }
        Ok(node)
    }

    /// Every field's rule holds, and one alternative of every `$or`.
    fn matches(&self, obj: &Map<String, Value>) -> bool {
        self.fields.iter().all(|(key, rule)| match rule {
            Rule::Nested(node) => match obj.get(key) {
                Some(Value::Object(inner)) => node.matches(inner),
                Some(Value::Array(items)) => {
                    items.iter().any(|i| matches!(i, Value::Object(inner) if node.matches(inner)))
                }
                _ => false,
            },
            Rule::Leaf(matchers) => matchers.iter().any(|m| m.matches(obj.get(key))),
        }) && self.any_of.iter().all(|alts| alts.iter().any(|n| n.matches(obj)))
    }
}

fn string_of(key: &str, v: &Value, op: &str) -> Result<String, InvalidFilter> {
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| InvalidFilter(format!("Invalid filter pattern: {op} for {key:?} takes a string, not {v}")))
}

impl Matcher {
    fn parse(key: &str, v: &Value) -> Result<Self, InvalidFilter> {
        let Value::Object(o) = v else {
            return match v {
                Value::Array(_) => Err(InvalidFilter(format!("Invalid filter pattern: nested list for {key:?}"))),
                _ => Ok(Matcher::Exact(v.clone())),
            };
        };
        let (op, arg) = match o.iter().next() {
            Some(kv) if o.len() == 1 => kv,
            _ => return Err(InvalidFilter(format!("Invalid filter pattern: {v} for {key:?} must have one operator"))),
        };
        Ok(match op.as_str() {
            "prefix" => Matcher::Prefix(string_of(key, arg, op)?),
            "suffix" => Matcher::Suffix(string_of(key, arg, op)?),
            "equals-ignore-case" => Matcher::EqualsIgnoreCase(string_of(key, arg, op)?),
            "wildcard" => Matcher::Wildcard(string_of(key, arg, op)?),
            "exists" => Matcher::Exists(arg.as_bool().ok_or_else(|| {
                InvalidFilter(format!("Invalid filter pattern: exists for {key:?} takes true or false"))
            })?),
            "anything-but" => match arg {
                Value::Array(values) if values.iter().all(|x| x.is_string() || x.is_number()) && !values.is_empty() => {
                    Matcher::AnythingBut(values.clone())
                }
                Value::String(_) | Value::Number(_) => Matcher::AnythingBut(vec![arg.clone()]),
                Value::Object(inner) if inner.len() == 1 => {
                    let (iop, iarg) = inner.iter().next().expect("one entry");
                    match iop.as_str() {
                        "prefix" => Matcher::AnythingButPrefix(string_of(key, iarg, "anything-but prefix")?),
                        "suffix" => Matcher::AnythingButSuffix(string_of(key, iarg, "anything-but suffix")?),
                        "equals-ignore-case" => Matcher::AnythingButIgnoreCase(match iarg {
                            Value::Array(a) => a.iter().map(|x| string_of(key, x, iop)).collect::<Result<_, _>>()?,
                            other => vec![string_of(key, other, iop)?],
                        }),
                        _ => {
                            return Err(InvalidFilter(format!(
                                "Invalid filter pattern: anything-but {iop} for {key:?}"
                            )));
                        }
                    }
                }
                other => {
                    return Err(InvalidFilter(format!("Invalid filter pattern: anything-but {other} for {key:?}")));
                }
            },
            "numeric" => {
                let Some(items) = arg.as_array().filter(|a| !a.is_empty() && a.len() % 2 == 0 && a.len() <= 4) else {
                    return Err(InvalidFilter(format!(
                        "Invalid filter pattern: numeric for {key:?} takes one or two (operator, number) pairs"
                    )));
                };
                let mut conditions = Vec::new();
                for pair in items.chunks(2) {
                    let op = pair[0].as_str().filter(|o| ["=", "<", "<=", ">", ">="].contains(o));
                    let (Some(op), Some(n)) = (op, pair[1].as_f64()) else {
                        return Err(InvalidFilter(format!("Invalid filter pattern: numeric {arg} for {key:?}")));
                    };
                    conditions.push((op.to_owned(), n));
                }
                Matcher::Numeric(conditions)
            }
            other => {
                return Err(InvalidFilter(format!("Invalid filter pattern: unknown operator {other:?} for {key:?}")));
            }
        })
    }

    /// Whether the field's value (`None`: absent) matches; an array matches if an element does.
    fn matches(&self, field: Option<&Value>) -> bool {
        if let Matcher::Exists(should) = self {
            return field.is_some() == *should;
        }
        match field {
            None => false,
            Some(Value::Array(items)) => items.iter().any(|i| self.matches_one(i)),
            Some(v) => self.matches_one(v),
        }
    }

    fn matches_one(&self, v: &Value) -> bool {
        match self {
            Matcher::Exact(expected) => match (expected, v) {
                // Numbers by their text: 300 and 300.0 differ, as AWS says.
                (Value::Number(a), Value::Number(b)) => a.to_string() == b.to_string(),
                _ => expected == v,
            },
            Matcher::Prefix(p) => v.as_str().is_some_and(|s| s.starts_with(p.as_str())),
            Matcher::Suffix(p) => v.as_str().is_some_and(|s| s.ends_with(p.as_str())),
            Matcher::EqualsIgnoreCase(p) => v.as_str().is_some_and(|s| s.to_lowercase() == p.to_lowercase()),
            Matcher::Wildcard(p) => v.as_str().is_some_and(|s| wildcard(p, s)),
            Matcher::AnythingBut(values) => match v {
                Value::String(_) | Value::Number(_) => !values.iter().any(|x| Matcher::Exact(x.clone()).matches_one(v)),
                _ => false,
            },
            Matcher::AnythingButPrefix(p) => v.as_str().is_some_and(|s| !s.starts_with(p.as_str())),
            Matcher::AnythingButSuffix(p) => v.as_str().is_some_and(|s| !s.ends_with(p.as_str())),
            Matcher::AnythingButIgnoreCase(values) => {
                v.as_str().is_some_and(|s| !values.iter().any(|x| x.to_lowercase() == s.to_lowercase()))
            }
            Matcher::Numeric(conditions) => v.as_f64().is_some_and(|n| {
                conditions.iter().all(|(op, bound)| match op.as_str() {
                    "=" => n == *bound,
                    "<" => n < *bound,
                    "<=" => n <= *bound,
                    ">" => n > *bound,
                    _ => n >= *bound,
                })
            }),
            Matcher::Exists(_) => unreachable!("handled in matches"),
        }
    }
}

/// EventBridge's wildcard: `*` matches any run of characters, `\*` a star.
fn wildcard(pattern: &str, s: &str) -> bool {
    // Tokens: literal characters, or a star.
    let mut tokens: Vec<Option<char>> = Vec::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => tokens.push(Some(chars.next().unwrap_or('\\'))),
            '*' => tokens.push(None),
            c => tokens.push(Some(c)),
        }
    }
    let text: Vec<char> = s.chars().collect();
    // Iterative matching with one backtrack point (the last star).
    let (mut t, mut p) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match tokens.get(p) {
            Some(Some(c)) if *c == text[t] => {
                t += 1;
                p += 1;
            }
            Some(None) => {
                star = Some((p, t));
                p += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    tokens[p..].iter().all(Option::is_none)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn criteria(patterns: &[Value]) -> FilterCriteria {
        let filters: Vec<Value> = patterns.iter().map(|p| json!({ "Pattern": p.to_string() })).collect();
        FilterCriteria::parse(&json!({ "Filters": filters })).unwrap()
    }

    fn passes(pattern: Value, data: Value) -> bool {
        criteria(&[pattern]).passes(data.to_string().as_bytes(), &Map::new())
    }

    /// AWS's rule table (invocation-eventfiltering.html, "Filter rule syntax"), each row.
    #[test]
    fn awss_comparison_operators() {
        let data = |v: Value| v;
        assert!(passes(json!({"data": {"UserID": [null]}}), data(json!({"UserID": null}))));
        assert!(!passes(json!({"data": {"UserID": [null]}}), data(json!({"UserID": "u"}))));
        assert!(passes(json!({"data": {"LastName": [""]}}), data(json!({"LastName": ""}))));
        assert!(passes(json!({"data": {"Name": ["Alice"]}}), data(json!({"Name": "Alice"}))));
        assert!(!passes(json!({"data": {"Name": ["Alice"]}}), data(json!({"Name": "alice"}))), "no case folding");
        assert!(passes(json!({"data": {"Name": [{"equals-ignore-case": "alice"}]}}), data(json!({"Name": "ALICE"}))));
        let and = json!({"data": {"Location": ["New York"], "Day": ["Monday"]}});
        assert!(passes(and.clone(), data(json!({"Location": "New York", "Day": "Monday"}))));
        assert!(!passes(and, data(json!({"Location": "New York", "Day": "Tuesday"}))));
        let or = json!({"data": {"PaymentType": ["Credit", "Debit"]}});
        assert!(passes(or.clone(), data(json!({"PaymentType": "Debit"}))));
        assert!(!passes(or, data(json!({"PaymentType": "Cash"}))));
        let or_fields = json!({"data": {"$or": [{"Location": ["New York"]}, {"Day": ["Monday"]}]}});
        assert!(passes(or_fields.clone(), data(json!({"Location": "Boston", "Day": "Monday"}))));
        assert!(!passes(or_fields, data(json!({"Location": "Boston", "Day": "Friday"}))));
        let not = json!({"data": {"Weather": [{"anything-but": ["Raining"]}]}});
        assert!(passes(not.clone(), data(json!({"Weather": "Sunny"}))));
        assert!(!passes(not.clone(), data(json!({"Weather": "Raining"}))));
        assert!(!passes(not, data(json!({"Temperature": 3}))), "anything-but needs the field");
        assert!(passes(json!({"data": {"Price": [{"numeric": ["=", 100]}]}}), data(json!({"Price": 100}))));
        assert!(
            passes(json!({"data": {"Price": [{"numeric": ["=", 100]}]}}), data(json!({"Price": 100.0}))),
            "numeric compares values"
        );
        let range = json!({"data": {"Price": [{"numeric": [">", 10, "<=", 20]}]}});
        assert!(passes(range.clone(), data(json!({"Price": 20}))));
        assert!(!passes(range.clone(), data(json!({"Price": 10}))));
        assert!(!passes(range, data(json!({"Price": "15"}))), "a string is not a number");
        assert!(passes(json!({"data": {"ProductName": [{"exists": true}]}}), data(json!({"ProductName": "x"}))));
        assert!(!passes(json!({"data": {"ProductName": [{"exists": true}]}}), data(json!({"Other": 1}))));
        assert!(passes(json!({"data": {"ProductName": [{"exists": false}]}}), data(json!({"Other": 1}))));
        assert!(passes(json!({"data": {"Region": [{"prefix": "us-"}]}}), data(json!({"Region": "us-east-1"}))));
        assert!(!passes(json!({"data": {"Region": [{"prefix": "us-"}]}}), data(json!({"Region": "eu-west-1"}))));
        assert!(passes(json!({"data": {"FileName": [{"suffix": ".png"}]}}), data(json!({"FileName": "a.png"}))));
    }

    /// AWS: "For numbers, Lambda also uses string representation. For example, 300, 300.0, and
    /// 3.0e2 are not considered equal."
    #[test]
    fn exact_numbers_by_their_text() {
        assert!(passes(json!({"data": {"n": [300]}}), json!({"n": 300})));
        assert!(!criteria(&[json!({"data": {"n": [300]}})]).passes(br#"{"n": 300.0}"#, &Map::new()));
        assert!(!criteria(&[json!({"data": {"n": [300]}})]).passes(br#"{"n": 3.0e2}"#, &Map::new()));
    }

    /// AWS's Kinesis example (with-kinesis-filtering.html): only orders of type "buy", nested.
    #[test]
    fn awss_kinesis_example_and_nesting_and_arrays() {
        let buy = json!({"data": {"order": {"type": ["buy"]}}});
        assert!(passes(
            buy.clone(),
            json!({"record": 12345, "order": {"type": "buy", "stock": "ANYCO", "quantity": 1000}})
        ));
        assert!(!passes(buy.clone(), json!({"record": 12346, "order": {"type": "sell"}})));
        assert!(!passes(buy, json!({"record": 1})));
        // A rule matches an array in the record if it matches one element.
        assert!(passes(json!({"data": {"tags": ["red"]}}), json!({"tags": ["blue", "red"]})));
        assert!(passes(
            json!({"data": {"items": {"sku": [{"prefix": "A"}]}}}),
            json!({"items": [{"sku": "B1"}, {"sku": "A2"}]})
        ));
    }

    /// The streams rule: non-JSON data is dropped by a pattern on data properties, filtered on
    /// the other keys alone without one.
    #[test]
    fn data_that_is_not_json() {
        let on_data = criteria(&[json!({"data": {"a": [{"exists": true}]}})]);
        assert!(!on_data.passes(b"not json", &Map::new()));
        assert!(!on_data.passes(b"[1,2]", &Map::new()), "JSON but not an object has no data properties");
        let metadata: Map<String, Value> = json!({"partitionKey": "1"}).as_object().unwrap().clone();
        let on_key = criteria(&[json!({"partitionKey": ["1"]})]);
        assert!(on_key.passes(b"not json", &metadata));
        assert!(!criteria(&[json!({"partitionKey": ["2"]})]).passes(b"{}", &metadata));
    }

    #[test]
    fn the_keys_besides_data_are_named() {
        let c = criteria(&[
            json!({"partitionKey": ["1"], "data": {"a": [1]}}),
            json!({"$or": [{"sequenceNumber": ["2"]}, {"partitionKey": ["3"]}]}),
        ]);
        assert_eq!(c.metadata_keys(), vec!["partitionKey", "sequenceNumber"]);
        assert!(criteria(&[json!({"data": {"a": [1]}})]).metadata_keys().is_empty());
    }

    #[test]
    fn filters_are_ored_and_none_passes_everything() {
        let two = criteria(&[json!({"data": {"a": [1]}}), json!({"data": {"b": [2]}})]);
        assert!(two.passes(br#"{"b":2}"#, &Map::new()));
        assert!(!two.passes(br#"{"c":3}"#, &Map::new()));
        assert!(FilterCriteria::parse(&json!({})).unwrap().passes(b"anything", &Map::new()));
    }

    #[test]
    fn more_operators_of_eventbridge() {
        assert!(passes(json!({"data": {"f": [{"wildcard": "*.png"}]}}), json!({"f": "dir/a.png"})));
        assert!(passes(json!({"data": {"f": [{"wildcard": "a*b*c"}]}}), json!({"f": "aXbYbc"})));
        assert!(!passes(json!({"data": {"f": [{"wildcard": "a*b"}]}}), json!({"f": "ab-"})));
        assert!(passes(json!({"data": {"f": [{"wildcard": "a\\*"}]}}), json!({"f": "a*"})));
        assert!(!passes(json!({"data": {"f": [{"wildcard": "a\\*"}]}}), json!({"f": "ab"})));
        assert!(passes(json!({"data": {"f": [{"anything-but": {"prefix": "tmp"}}]}}), json!({"f": "data"})));
        assert!(!passes(json!({"data": {"f": [{"anything-but": {"prefix": "tmp"}}]}}), json!({"f": "tmp1"})));
        assert!(!passes(json!({"data": {"f": [{"anything-but": {"equals-ignore-case": ["X"]}}]}}), json!({"f": "x"})));
        assert!(passes(json!({"data": {"n": [{"anything-but": [1, 2]}]}}), json!({"n": 3})));
    }

    /// AWS's limits and the shapes it refuses at creation.
    #[test]
    fn limits_and_bad_patterns_are_refused() {
        let six: Vec<Value> = (0..6).map(|i| json!({"Pattern": json!({"data": {"a": [i]}}).to_string()})).collect();
        let e = FilterCriteria::parse(&json!({"Filters": six})).unwrap_err();
        assert!(e.0.contains("exceeds the limit of 5"), "{e}");
        let long = format!("{{\"data\": {{\"a\": [\"{}\"]}}}}", "x".repeat(4100));
        let e = FilterCriteria::parse(&json!({"Filters": [{"Pattern": long}]})).unwrap_err();
        assert!(e.0.contains("less than or equal to 4096"), "{e}");
        for bad in [
            "not json",
            "[1]",
            r#"{"data": "plain"}"#,
            r#"{"data": {"a": 1}}"#,
            r#"{"data": {"a": []}}"#,
            r#"{"data": {"a": [{"numeric": [">", "x"]}]}}"#,
            r#"{"data": {"a": [{"nope": 1}]}}"#,
            r#"{"data": {"$or": [{"a": [1]}]}}"#,
        ] {
            assert!(FilterCriteria::parse(&json!({"Filters": [{"Pattern": bad}]})).is_err(), "{bad}");
        }
    }

    proptest::proptest! {
        /// Any bytes as data, any pattern text: never a panic.
        #[test]
        fn never_panics(data in proptest::collection::vec(proptest::num::u8::ANY, 0..64), text in ".{0,64}") {
            if let Ok(c) = FilterCriteria::parse(&json!({"Filters": [{"Pattern": text}]})) {
                let _ = c.passes(&data, &Map::new());
            }
            let c = criteria(&[json!({"data": {"a": [{"wildcard": "*x*"}], "$or": [{"b": [1]}, {"c": [{"exists": false}]}]}})]);
            let _ = c.passes(&data, &Map::new());
        }

        /// A wildcard without stars is exact matching; `*` alone matches every string.
        #[test]
        fn wildcard_agrees_with_equality(s in "[a-c]{0,6}", p in "[a-c]{0,6}") {
            proptest::prop_assert_eq!(wildcard(&p, &s), p == s);
            proptest::prop_assert!(wildcard("*", &s));
            let (prefix, text) = (format!("{}*", p), format!("{}{}", p, s));
            proptest::prop_assert!(wildcard(&prefix, &text));
        }
    }
}
