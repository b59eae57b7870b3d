//! The name of a record a queue sink publishes: the object and line it came from, the same on
//! every resend, so that a consumer counts each line once (RabbitMQ's `message-id`, the SQS
//! sink's `pushpull-origin` attribute).

/// The longest name: AMQP's `message-id` is a short string (255 bytes); SQS's message attribute
/// values take it too.
const MAX_MESSAGE_ID: usize = 255;

/// The `message-id` of line `line` of the object `origin` (`<bucket>/<key>@<version>`, as the
/// push loop names it), as the RabbitMQ sink sets it (its `message-id`) and the SQS sink (a message
/// attribute): `<origin>#<line>`; an origin too long for AMQP's 255-byte short string is replaced
/// by `xxh3:` and its 128-bit hash.
///
/// ```
/// use pushpull::message_name::{message_id, parse_message_id};
/// assert_eq!(message_id("in/a.ndjson@v1", 7), "in/a.ndjson@v1#7");
/// let long = format!("in/{}@v1", "k".repeat(300));
/// let id = message_id(&long, 7);
/// assert!(id.starts_with("xxh3:") && id.len() <= 255);
/// assert_eq!(parse_message_id(&id), Some((&id[..id.len() - 2], 7)));
/// ```
pub fn message_id(origin: &str, line: u64) -> String {
    let id = format!("{origin}#{line}");
    if id.len() <= MAX_MESSAGE_ID {
        return id;
    }
    format!("xxh3:{:032x}#{line}", xxhash_rust::xxh3::xxh3_128(origin.as_bytes()))
}

/// The origin and line a [`message_id`] names; `None` for an id of another form.
pub fn parse_message_id(id: &str) -> Option<(&str, u64)> {
    let (origin, line) = id.rsplit_once('#')?;
    Some((origin, line.parse().ok()?))
}
