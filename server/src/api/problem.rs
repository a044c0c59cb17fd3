//! RFC 7807 problem responses.
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

/// An RFC 7807 problem (`application/problem+json`).
#[derive(Clone, Debug, Serialize, ToSchema)]
pub struct Problem {
    /// URI identifying the problem type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Short summary of the problem type.
    pub title: String,
    /// HTTP status.
    pub status: u16,
    /// What went wrong here and how to fix it.
    pub detail: String,
    /// Every individual problem (invalid events by index and field, bad parameters).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<ProblemItem>,
    #[serde(skip)]
    retry_after_secs: Option<u64>,
}

/// One item of a problem.
#[derive(Clone, Debug, Serialize, ToSchema, PartialEq)]
pub struct ProblemItem {
    /// Index of the event in the request (batches).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// The event attribute at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// The query parameter at fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl Problem {
    /// A problem of type `https://tally.dev/problems/{kind}`.
    pub fn new(status: StatusCode, kind: &str, title: &str, detail: impl Into<String>) -> Problem {
        Problem {
            ty: format!("https://tally.dev/problems/{kind}"),
            title: title.to_string(),
            status: status.as_u16(),
            detail: detail.into(),
            errors: Vec::new(),
            retry_after_secs: None,
        }
    }

    /// A 400 naming a bad query parameter.
    pub fn bad_parameter(parameter: &str, message: impl Into<String>) -> Problem {
        let message = message.into();
        let mut p = Problem::new(
            StatusCode::BAD_REQUEST,
            "invalid-parameter",
            "Invalid query parameter",
            format!("{parameter}: {message}"),
        );
        p.errors.push(ProblemItem {
            index: None,
            field: None,
            parameter: Some(parameter.to_string()),
            message,
        });
        p
    }

    /// A 404 for an unknown meter.
    pub fn meter_not_found(namespace: &str, slug: &str) -> Problem {
        Problem::new(
            StatusCode::NOT_FOUND,
            "meter-not-found",
            "Meter not found",
            format!(
                "no meter with slug {slug:?} in namespace {namespace:?}; GET /api/v1/meters lists the meters"
            ),
        )
    }

    /// A 503 the client should retry after `secs`.
    pub fn overloaded(detail: impl Into<String>, secs: u64) -> Problem {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "Server at capacity",
            detail,
        );
        p.retry_after_secs = Some(secs);
        p
    }

    /// A 503 because a service the server depends on (Kafka, ClickHouse) is unreachable.
    pub fn unavailable(detail: impl Into<String>) -> Problem {
        let mut p = Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "Storage unavailable",
            detail,
        );
        p.retry_after_secs = Some(5);
        p
    }

    /// A 500 for a failure inside the server.
    pub fn internal(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "Internal error",
            detail,
        )
    }

    /// Adds items.
    pub fn with_errors(mut self, errors: Vec<ProblemItem>) -> Problem {
        self.errors = errors;
        self
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut res = (status, body).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        res
    }
}

impl From<tally_meter::Error> for Problem {
    fn from(e: tally_meter::Error) -> Problem {
        match e {
            tally_meter::Error::Overloaded => Problem::overloaded(
                "the ingest queue is full; retry after the Retry-After delay",
                1,
            ),
            tally_meter::Error::Unavailable(why) => Problem::unavailable(why),
            e @ tally_meter::Error::ClickHouse { .. } => {
                tracing::error!(error = %e, "ClickHouse request failed");
                Problem::unavailable(e.to_string())
            }
            tally_meter::Error::Query(q) => Problem::new(
                StatusCode::BAD_REQUEST,
                "query-too-large",
                "Query too large",
                q.to_string(),
            ),
            other => {
                tracing::error!(error = %other, "Request failed inside the server");
                Problem::internal(other.to_string())
            }
        }
    }
}
