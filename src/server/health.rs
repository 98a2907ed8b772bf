//! tonic-health's service behind the health server generated in
//! `build.rs`, so that its requests are read as every other service's.

use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::Health as _;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

pub struct Health(HealthService);

impl Health {
    pub fn new(reporter: HealthReporter) -> Self {
        Self(HealthService::from_health_reporter(reporter))
    }
}

#[tonic::async_trait]
impl crate::pb::health::health_server::Health for Health {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        self.0.check(request).await
    }

    type WatchStream = <HealthService as tonic_health::pb::health_server::Health>::WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        self.0.watch(request).await
    }
}
