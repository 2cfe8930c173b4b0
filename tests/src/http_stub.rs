//! A local HTTP server for `tasker.http` tests: answers from a script, records when each
//! request arrived. Binds 127.0.0.1 on a free port.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
}

impl Answer {
    pub fn new(status: u16, body: &str) -> Self {
        Answer {
            status,
            headers: Vec::new(),
            body: body.to_owned(),
        }
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }
}

#[derive(Default)]
struct Script {
    answers: Vec<Answer>,
    arrivals: Vec<Instant>,
}

/// The running stub.
#[derive(Clone)]
pub struct HttpStub {
    pub url: String,
    script: Arc<Mutex<Script>>,
}

impl HttpStub {
    /// Serve `answers` in order; the last one repeats.
    pub async fn start(answers: Vec<Answer>) -> anyhow::Result<Self> {
        let script = Arc::new(Mutex::new(Script {
            answers,
            arrivals: Vec::new(),
        }));
        let app = Router::new().fallback(answer).with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/", listener.local_addr()?);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Ok(HttpStub { url, script })
    }

    /// When each request arrived.
    pub fn arrivals(&self) -> Vec<Instant> {
        self.script.lock().unwrap().arrivals.clone()
    }
}

async fn answer(State(script): State<Arc<Mutex<Script>>>) -> Response {
    let answer = {
        let mut script = script.lock().unwrap();
        let index = script
            .arrivals
            .len()
            .min(script.answers.len().saturating_sub(1));
        script.arrivals.push(Instant::now());
        script
            .answers
            .get(index)
            .cloned()
            .unwrap_or_else(|| Answer::new(500, "no script"))
    };
    let mut response = (
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        answer.body,
    )
        .into_response();
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}
