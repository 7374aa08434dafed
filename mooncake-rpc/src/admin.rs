//! Membership of a Raft master group: the admin requests a group's leader serves
//! ([`AdminRequest`], answered with the resulting [`Members`]). [`call_admin`](crate::call_admin)
//! sends one to a group and follows its leader.

use serde::{Deserialize, Serialize};

/// A membership request to a master group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The membership as the leader has applied it.
    Members,
    /// Add a non-voting member; start it with `--raft_join` first.
    AddLearner {
        /// Its Raft id (not in use in the group).
        id: u64,
        /// Where its Raft transport listens.
        raft_addr: String,
        /// Its RPC address (what clients are redirected to when it leads).
        rpc_addr: String,
    },
    /// Make a learner that has caught up a voter.
    Promote {
        /// The learner's id.
        id: u64,
    },
    /// Remove a voter or a learner; removing the leader makes it hand leadership over.
    Remove {
        /// The member's id.
        id: u64,
    },
}

/// A member's part in the group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberRole {
    /// Counts for elections and commits.
    Voter,
    /// Receives the log, counts for nothing.
    Learner,
}

/// One member of a master group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    /// Raft id.
    pub id: u64,
    /// Voter or learner.
    pub role: MemberRole,
    /// Its Raft address.
    pub raft_addr: String,
    /// Its RPC address.
    pub rpc_addr: String,
    /// The highest log index the leader knows is replicated on it.
    pub matched: Option<u64>,
}

/// A master group's membership, as its leader has applied it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Members {
    /// The member that answered.
    pub answered_by: u64,
    /// The leader it knows (`None` right after it removed itself and handed leadership over).
    pub leader: Option<u64>,
    /// Its term.
    pub term: u64,
    /// Its commit index.
    pub commit_index: u64,
    /// Voters then learners, each by id.
    pub members: Vec<Member>,
}

impl Members {
    /// Ids of the voters.
    pub fn voters(&self) -> Vec<u64> {
        self.with_role(MemberRole::Voter)
    }

    /// Ids of the learners.
    pub fn learners(&self) -> Vec<u64> {
        self.with_role(MemberRole::Learner)
    }

    fn with_role(&self, role: MemberRole) -> Vec<u64> {
        self.members
            .iter()
            .filter(|m| m.role == role)
            .map(|m| m.id)
            .collect()
    }

    /// A table for people.
    pub fn render(&self) -> String {
        let mut out = format!(
            "leader {}, term {}, commit index {} (answered by {})\n",
            self.leader.map_or("unknown".into(), |l| l.to_string()),
            self.term,
            self.commit_index,
            self.answered_by
        );
        out.push_str(&format!(
            "{:>4}  {:<8} {:<24} {:<24} {}\n",
            "id", "role", "raft_address", "rpc_address", "matched"
        ));
        for m in &self.members {
            let role = match m.role {
                MemberRole::Voter => "voter",
                MemberRole::Learner => "learner",
            };
            out.push_str(&format!(
                "{:>4}  {:<8} {:<24} {:<24} {}\n",
                m.id,
                role,
                m.raft_addr,
                m.rpc_addr,
                m.matched.map_or("-".into(), |i| i.to_string())
            ));
        }
        out
    }
}
