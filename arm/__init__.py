"""The cell controller: hardware interfaces (Arm, Gripper, Camera), the decision loop, the daemon."""
