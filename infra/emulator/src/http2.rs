//! An HTTP client for the AWS SDK that speaks HTTP/2 to a plain `http://` endpoint (prior
//! knowledge, "h2c"), as Kinesis serves `SubscribeToShard`: "This operation establishes an HTTP/2
//! connection between the consumer you specify in the ConsumerARN parameter and the shard"
//! (API Reference). The SDK's own client negotiates HTTP/2 only over TLS, and LocalStack's
//! endpoint here is plain HTTP, so the local mapping reads a stream consumer through this one,
//! and `pushpull-local`'s proxy (which serves `SubscribeToShard`) answers HTTP/1.1 and HTTP/2 alike.
//!
//! ```no_run
//! # async fn f() {
//! let kinesis = pushpull_emulator::http2::kinesis("http://127.0.0.1:4566", "test").await;
//! # }
//! ```
use aws_smithy_runtime_api::client::http::{
    HttpConnector, HttpConnectorFuture, SharedHttpClient, SharedHttpConnector, http_client_fn,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_types::body::SdkBody;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector as TcpConnector;
use hyper_util::rt::TokioExecutor;

/// Sends every request over HTTP/2 with prior knowledge.
#[derive(Debug, Clone)]
struct Http2Connector {
    client: Client<TcpConnector, SdkBody>,
}

impl HttpConnector for Http2Connector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let client = self.client.clone();
        HttpConnectorFuture::new(async move {
            let request = request.try_into_http1x().map_err(|e| ConnectorError::user(e.into()))?;
            let response = client.request(request).await.map_err(|e| ConnectorError::io(e.into()))?;
            let (parts, body) = response.into_parts();
            let response = hyper::http::Response::from_parts(parts, SdkBody::from_body_1_x(body));
            HttpResponse::try_from(response).map_err(|e| ConnectorError::other(e.into(), None))
        })
    }
}

/// The SDK client that speaks HTTP/2 without TLS.
pub fn client() -> SharedHttpClient {
    let mut tcp = TcpConnector::new();
    tcp.set_nodelay(true);
    let connector = Http2Connector { client: Client::builder(TokioExecutor::new()).http2_only(true).build(tcp) };
    http_client_fn(move |_settings, _components| SharedHttpConnector::new(connector.clone()))
}

/// A Kinesis client for `endpoint` over HTTP/2, signing with `access_key` (as
/// [`crate::localstack::Local::at`] does).
pub async fn kinesis(endpoint: &str, access_key: &str) -> aws_sdk_kinesis::Client {
    let config = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new(crate::localstack::REGION))
        .credentials_provider(aws_sdk_kinesis::config::Credentials::new(access_key, "test", None, None, "local"))
        .http_client(client())
        .load()
        .await;
    aws_sdk_kinesis::Client::new(&config)
}
