//! The admin requests a master group's leader serves: membership changes applied through the
//! group of the service's command log (see `mooncake_master admin`, in [`crate::admin_cli`]).

use mooncake_core::{Error, Result};
use mooncake_rpc::admin::{AdminRequest, Member, MemberRole, Members};
use mooncake_rpc::MasterReply;

use super::MasterService;

/// Serves an admin request on `service` (the caller has checked that it leads).
pub(crate) async fn serve(service: &MasterService, request: AdminRequest) -> MasterReply {
    match serve_group(service, request).await {
        Ok(members) => MasterReply::Members(members),
        // Not (or no longer) the leader, and nothing was proposed: safe to redirect.
        Err(e) => service.failure_reply(&e),
    }
}

/// Applies `request` to the group of the service's command log, when it has one.
async fn serve_group(service: &MasterService, request: AdminRequest) -> Result<Members> {
    let Some(group) = service.command_log().group() else {
        return Err(not_a_group());
    };
    match request {
        AdminRequest::Members => {}
        AdminRequest::AddLearner {
            id,
            raft_addr,
            rpc_addr,
        } => group.add_learner(id, raft_addr, rpc_addr).await?,
        AdminRequest::Promote { id } => group.promote(id).await?,
        AdminRequest::Remove { id } => group.remove(id).await?,
    }
    let m = group.members().await?;
    Ok(Members {
        answered_by: m.answered_by,
        leader: m.leader,
        term: m.term,
        commit_index: m.commit_index,
        members: m
            .members
            .into_iter()
            .map(|g| Member {
                id: g.id,
                role: if g.voter {
                    MemberRole::Voter
                } else {
                    MemberRole::Learner
                },
                raft_addr: g.log_addr,
                rpc_addr: g.service_addr,
                matched: g.matched,
            })
            .collect(),
    })
}

fn not_a_group() -> Error {
    Error::NotSupported(
        "this master is not a member of a Raft group (started without --raft_id)".into(),
    )
}
